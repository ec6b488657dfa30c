"""``imagefolder:DIR`` and ``text:FILE`` data (:mod:`symmerge.realdata`): images preprocessed
the model's own way (timm's data config, an ``hf:`` image processor, resize/crop with
ImageNet or explicit statistics) and lines tokenised by the ``hf:`` directory's tokenizer.
Everything is written here (PNG/JPEG folders, a word-level tokenizer, tiny BERTs): no
network, no datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from symmerge.cli import main
from symmerge.realdata import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from symmerge.sources import DataSourceError, data_source_batches, load_data_sources

pytestmark = pytest.mark.usefixtures("one_thread")

#: One colour per class (sorted folder order: ant=0, bee=1, cow=2), a dominant channel each.
COLOURS = {"ant": (200, 30, 10), "bee": (20, 220, 40), "cow": (5, 60, 240)}

WORDS = ["[PAD]", "[UNK]", "the", "cat", "dog", "sat", "on", "mat", "ran", "fast", "red"]


def _luma(colour: tuple[int, int, int]) -> int:
    return Image.new("RGB", (1, 1), colour).convert("L").getpixel((0, 0))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three classes of two constant-colour images each, of different sizes and formats
    (RGB and RGBA PNG, greyscale-free JPEG), plus a file that is not an image."""
    root = tmp_path / "images"
    sizes = [(40, 30), (23, 57)]
    for name, colour in COLOURS.items():
        (root / name).mkdir(parents=True)
        for k, size in enumerate(sizes):
            if name == "cow" and k == 1:
                Image.new("RGBA", size, (*colour, 128)).save(root / name / f"{k}.png")
            else:
                fmt = "jpeg" if name == "bee" and k == 1 else "png"
                Image.new("RGB", size, colour).save(root / name / f"{k}.{fmt}", quality=100)
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


def _pixels(x: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """Back to [0, 255] pixel values."""
    view = (1, -1, 1, 1)
    return (x * torch.tensor(std).view(view) + torch.tensor(mean).view(view)) * 255


def _check_classes(x: torch.Tensor, y: torch.Tensor, mean: tuple, std: tuple) -> None:
    """Every image is one constant colour, the colour of its label's class."""
    pixels = _pixels(x, mean, std)
    for img, label in zip(pixels, y.tolist(), strict=True):
        colour = torch.tensor(list(COLOURS.values())[label], dtype=torch.float32)
        torch.testing.assert_close(img.mean((1, 2)), colour, atol=1.5, rtol=0)
        assert float(img.std((1, 2)).max()) < 1.0  # constant images stay constant


# --- imagefolder --------------------------------------------------------------------------


def test_timm_model_gets_timm_preprocessing(folder: Path) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("test_resnet", num_classes=3).eval()
    cfg = timm.data.resolve_data_config({}, model=model)  # 160 px, mean = std = 0.5
    x, y = load_data_sources(f"imagefolder:{folder}", model=model)
    assert x.shape == (6, *cfg["input_size"]) and x.dtype == torch.float32
    assert sorted(y.tolist()) == [0, 0, 1, 1, 2, 2]
    _check_classes(x, y, cfg["mean"], cfg["std"])
    # ant is (200, 30, 10): (200/255 - 0.5) / 0.5 in the red channel
    ant = x[y == 0][0]
    assert float(ant[0].mean()) == pytest.approx((200 / 255 - 0.5) / 0.5, abs=1e-5)

    # explicit size and statistics override timm's
    prep = Preprocessing(image_size=(32, 48), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    x, y = load_data_sources(f"imagefolder:{folder}", model=model, preprocessing=prep)
    assert x.shape == (6, 3, 32, 48)
    _check_classes(x, y, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_explicit_size_mean_std_and_greyscale(folder: Path) -> None:
    prep = Preprocessing(image_size=(16, 24), mean=(0.5, 0.4, 0.3), std=(0.25, 0.5, 1.0))
    batches = data_source_batches(f"imagefolder:{folder}", 4, preprocessing=prep)
    assert [len(by) for _, by in batches] == [4, 2]
    x, y = torch.cat([bx for bx, _ in batches]), torch.cat([by for _, by in batches])
    assert x.shape == (6, 3, 16, 24)
    _check_classes(x, y, prep.mean, prep.std)
    ant = x[y == 0][0]
    mean, std = torch.tensor(prep.mean), torch.tensor(prep.std)
    expected = (torch.tensor(COLOURS["ant"]) / 255 - mean) / std
    torch.testing.assert_close(ant.mean((1, 2)), expected, atol=1e-5, rtol=0)

    # one mean/std value: greyscale, PIL's luma of each colour
    grey = Preprocessing(image_size=(8, 8), mean=(0.5,), std=(0.5,))
    x, y = load_data_sources(f"imagefolder:{folder}", preprocessing=grey)
    assert x.shape == (6, 1, 8, 8)
    for img, label in zip(x, y.tolist(), strict=True):
        luma = _luma(list(COLOURS.values())[label])
        assert float(img.mean()) == pytest.approx((luma / 255 - 0.5) / 0.5, abs=0.01)


def test_plain_model_input_shape_and_imagenet_statistics(folder: Path) -> None:
    """A model that records its input shape (torchvision's, the zoo's) and no recipe:
    resize/crop to that shape with ImageNet's mean/std; a 1-channel model gets greyscale."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))  # fmt: skip
    model.input_shape = (3, 20, 12)
    x, y = load_data_sources(f"imagefolder:{folder}", model=model)
    assert x.shape == (6, 3, 20, 12)
    _check_classes(x, y, IMAGENET_MEAN, IMAGENET_STD)

    grey = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3))  # fmt: skip
    grey.input_shape = (1, 28, 28)  # an MNIST model: MNIST's statistics
    x, y = load_data_sources(f"imagefolder:{folder}", model=grey, datasets=["mnist"])
    assert x.shape == (6, 1, 28, 28)
    luma = _luma(COLOURS["cow"])
    assert float(x[y == 2][0].mean()) == pytest.approx((luma / 255 - 0.1307) / 0.3081, abs=0.02)


def test_torchvision_model(folder: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.get_model("resnet18", weights=None, num_classes=3).eval()
    model.input_shape = (3, 32, 32)  # as symmerge.io records it
    x, y = load_data_sources(f"imagefolder:{folder}", model=model, reference="torchvision:r")
    assert x.shape == (6, 3, 32, 32)
    _check_classes(x, y, IMAGENET_MEAN, IMAGENET_STD)


def test_hf_image_processor(folder: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    directory = tmp_path / "vit"
    transformers.ViTImageProcessor(
        size={"height": 12, "width": 10}, image_mean=[0.5, 0.5, 0.5], image_std=[0.2, 0.2, 0.2]
    ).save_pretrained(directory)
    x, y = load_data_sources(f"imagefolder:{folder}", reference=f"hf:{directory}")
    assert x.shape == (6, 3, 12, 10)
    _check_classes(x, y, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))
    prep = Preprocessing(image_size=(6, 7), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    x, y = load_data_sources(f"imagefolder:{folder}", reference=f"hf:{directory}",
                             preprocessing=prep)  # fmt: skip
    assert x.shape == (6, 3, 6, 7)
    _check_classes(x, y, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def test_samples_are_drawn_with_the_seed(folder: Path) -> None:
    prep = Preprocessing(image_size=(4, 4), mean=(0.5,) * 3, std=(0.5,) * 3)

    def load(seed: int, samples: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        return load_data_sources(f"imagefolder:{folder}", samples=samples, seed=seed,
                                 preprocessing=prep)  # fmt: skip

    x, y = load(0)
    again, y_again = load(0)
    assert len(y) == 4 and torch.equal(x, again) and torch.equal(y, y_again)
    subsets = {tuple(sorted(load(seed)[1].tolist())) for seed in range(6)}
    orders = {tuple(load(seed, 6)[1].tolist()) for seed in range(6)}
    assert len(subsets) > 1 and len(orders) > 1  # the seed picks and shuffles
    assert all(sorted(o) == [0, 0, 1, 1, 2, 2] for o in orders)  # all when fewer


# --- text -----------------------------------------------------------------------------------


def _tokenizer(directory: Path, pad: bool = True) -> object:
    """A word-level tokenizer over WORDS, saved in ``directory`` (no network)."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    special = {"pad_token": "[PAD]"} if pad else {"eos_token": "red"}
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                                **special)  # fmt: skip
    fast.save_pretrained(directory)
    return fast


def _bert(directory: Path, seed: int, tokenizer: bool = True) -> str:
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=50, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(seed)
    transformers.BertForSequenceClassification(config).save_pretrained(directory)
    if tokenizer:
        _tokenizer(directory)
    return f"hf:{directory}"


@pytest.fixture(scope="module")
def berts(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("berts")
    return _bert(root / "a", 0), _bert(root / "b", 1)


@pytest.fixture
def lines(tmp_path: Path) -> Path:
    file = tmp_path / "lines.txt"
    file.write_text("2\tthe cat sat\n\n   \nthe dog ran fast on the red mat again\n1\tcat zebra\n")
    return file


def _load_model(ref: str) -> nn.Module:
    from symmerge.resolve import load_model

    return load_model(ref).model


def test_text_lines_are_tokenised_padded_truncated_and_labelled(
    berts: tuple[str, str], lines: Path
) -> None:
    ref = berts[0]
    prep = Preprocessing(max_length=6)
    x, y = load_data_sources(f"text:{lines}", reference=ref, model=_load_model(ref),
                             preprocessing=prep)  # fmt: skip
    assert x.dtype == torch.long and x.shape == (3, 6)
    ids = {w: i for i, w in enumerate(WORDS)}
    expected = {  # by label: padded with [PAD] (0), truncated to 6, unknown words [UNK]
        2: [ids["the"], ids["cat"], ids["sat"], 0, 0, 0],
        0: [ids[w] for w in "the dog ran fast on the".split()],
        1: [ids["cat"], ids["[UNK]"], 0, 0, 0, 0],
    }
    assert sorted(y.tolist()) == [0, 1, 2]
    for row, label in zip(x.tolist(), y.tolist(), strict=True):
        assert row == expected[label]
    # batches for merge(), and the seed draws lines
    batches = data_source_batches(f"text:{lines}", 2, reference=ref, samples=2, seed=3)
    assert [tuple(bx.shape) for bx, _ in batches] == [(2, 128)]  # default --max-length 128


def test_text_without_labels_gets_placeholder_zero_and_eos_padding(tmp_path: Path) -> None:
    directory = tmp_path / "tok"
    _tokenizer(directory, pad=False)  # no pad token: eos ("red") pads
    file = tmp_path / "plain.txt"
    file.write_text("the cat\ndog\n")
    x, y = load_data_sources(f"text:{file}", reference=f"hf:{directory}",
                             preprocessing=Preprocessing(max_length=3))  # fmt: skip
    red = WORDS.index("red")
    assert sorted(x.tolist()) == sorted([[2, 3, red], [4, red, red]])
    assert y.tolist() == [0, 0]


def test_merge_two_hf_models_on_text_from_the_cli(
    berts: tuple[str, str], lines: Path, tmp_path: Path
) -> None:
    from symmerge.resolve import load_model

    out = tmp_path / "merged.safetensors"
    args = ["merge", *berts, "-m", "activation", "--data", f"text:{lines}", "--max-length", "8"]
    result = CliRunner().invoke(main, [*args, "-o", str(out)])
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.exit_code == 0, result.output
    # a symmerge checkpoint, or a save_pretrained directory where merge writes hf: inputs so
    merged = load_model(f"hf:{out}" if out.is_dir() else str(out)).model
    ids = torch.tensor([[2, 3, 5, 0, 0, 0, 0, 0]])
    logits = merged(ids)[0]
    assert logits.shape == (1, 3) and torch.isfinite(logits).all()


# --- errors ---------------------------------------------------------------------------------


def _cli_error(*args: str) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug: bad input must be a clean error
    assert result.exit_code == 2, result.output
    return " ".join(result.output.split())


def test_image_folder_errors(tmp_path: Path, folder: Path) -> None:
    prep = Preprocessing(image_size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "a.png")
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("x")
    for spec, message in [
        (f"imagefolder:{tmp_path / 'nope'}", "does not exist or is not a directory"),
        (f"imagefolder:{flat}", "has no class subfolders"),
        (f"imagefolder:{empty}", r"class folders .* hold no images"),
        ("imagefolder:", "write imagefolder:PATH"),
    ]:
        with pytest.raises(DataSourceError, match=message):
            load_data_sources(spec, preprocessing=prep)
    # no size known: the model records no input shape and none is given
    conv = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(DataSourceError, match="pass --image-size"):
        load_data_sources(f"imagefolder:{folder}", model=conv)
    # channels no image folder gives
    two = nn.Sequential(nn.Conv2d(2, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(DataSourceError, match="take 2-channel images"):
        load_data_sources(f"imagefolder:{folder}", model=two, preprocessing=Preprocessing((8, 8)))
    # a size the model cannot take, and more classes than outputs
    fixed = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))
    fixed.input_shape = (3, 16, 16)
    with pytest.raises(DataSourceError, match=r"do not accept the images .*\(3, 8, 8\)"):
        load_data_sources(f"imagefolder:{folder}", model=fixed, preprocessing=prep)
    narrow = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    narrow.input_shape = (3, 16, 16)
    with pytest.raises(DataSourceError, match="labels 0..2 but the models have 2 outputs"):
        load_data_sources(f"imagefolder:{folder}", model=narrow)


def test_text_errors(tmp_path: Path, berts: tuple[str, str], lines: Path, folder: Path) -> None:
    bert = _load_model(berts[0])
    bare = _bert(tmp_path / "bare", 0, tokenizer=False)  # weights, no tokenizer files
    bad_label = tmp_path / "label.txt"
    bad_label.write_text("7\tthe cat\n")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    conv = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    short = Preprocessing(max_length=8)
    cases = [
        (f"text:{lines}", {}, "no tokenizer: text:.* needs the first model to be an hf:DIRECTORY"),
        (f"text:{lines}", {"reference": "timm:resnet18=x.pt"}, "no tokenizer"),
        (f"text:{lines}", {"reference": bare}, "no tokenizer.*tokenizer.save_pretrained"),
        (f"text:{tmp_path / 'missing.txt'}", {"reference": berts[0]}, "does not exist"),
        (f"text:{blank}", {"reference": berts[0]}, "holds no non-blank lines"),
        (f"text:{lines}", {"model": conv}, "gives token ids but the models take images"),
        (f"text:{bad_label}", {"reference": berts[0], "model": bert, "preprocessing": short},
         "labels 0..7 but the models have 3 outputs"),
        (f"text:{lines}", {"reference": berts[0], "model": bert}, "more than the 16 positions"),
        (f"imagefolder:{folder}", {"reference": berts[0], "model": bert},
         "gives images but the models take token ids"),
    ]  # fmt: skip
    for spec, kwargs, message in cases:
        with pytest.raises(DataSourceError, match=message):
            load_data_sources(spec, **kwargs)
    # images and token ids in one spec
    mixed = f"text:{lines},imagefolder:{folder}"
    prep = Preprocessing(image_size=(4, 4), mean=(0.5,) * 3, std=(0.5,) * 3, max_length=8)
    with pytest.raises(DataSourceError, match="share one shape"):
        load_data_sources(mixed, reference=berts[0], preprocessing=prep)


def test_cli_errors_are_clean(berts: tuple[str, str], lines: Path, tmp_path: Path) -> None:
    out = tmp_path / "m.safetensors"
    a, b = berts
    text = _cli_error("merge", a, b, "-m", "activation", "--data", f"text:{lines}", "-o", out)
    assert "more than the 16 positions" in text and "--max-length 16" in text
    text = _cli_error("merge", a, b, "-m", "activation", "--data", "text:/no/such.txt", "-o", out)
    assert "does not exist" in text
    text = _cli_error("merge", a, b, "--mean", "0.5,x", "-o", out)
    assert "--mean" in text and "comma-separated floats" in text
    text = _cli_error("merge", a, b, "--mean", "0.5", "--std", "0.1,0.2,0.3", "-o", out)
    assert "one value per channel" in text
    text = _cli_error("merge", a, b, "--image-size", "0", "-o", out)
    assert "image size must be two positive integers" in text
    assert not out.exists()
