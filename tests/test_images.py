"""Photos of digits: prepared as MNIST's were, they are read about as well as MNIST's own arrays."""

import io

import numpy as np
import pytest

PIL = pytest.importorskip("PIL", reason="Pillow is not installed (the images extra)")
from conftest import _read_idx_gz, data_root  # noqa: E402
from PIL import Image  # noqa: E402

import fastnn  # noqa: E402
from fastnn.images import mnist_style, read_image  # noqa: E402
from fastnn.readers import read_images  # noqa: E402


def photo(digit: np.ndarray, rng, size=(320, 240)) -> bytes:
    """A 28x28 MNIST digit as a photo: dark ink on light grey paper, 4-8x larger, anywhere in an RGB
    frame, saved as JPEG."""
    scale = int(rng.integers(4, 9))
    ink = Image.fromarray(255 - digit).resize((28 * scale, 28 * scale), Image.Resampling.BICUBIC)
    paper = Image.new("L", size, int(rng.integers(200, 240)))
    x, y = int(rng.integers(0, size[0] - ink.width)), int(rng.integers(0, size[1] - ink.height))
    paper.paste(Image.fromarray(np.minimum(np.asarray(ink), np.asarray(paper)[y:y + ink.height, x:x + ink.width])),
                (x, y))
    buf = io.BytesIO()
    paper.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def mnist_test_set():
    d = data_root() / "mnist"
    if not (d / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"the MNIST test set is not in {d}: needed for this accuracy claim only")
    return _read_idx_gz(d / "t10k-images-idx3-ubyte.gz").reshape(-1, 784), _read_idx_gz(d / "t10k-labels-idx1-ubyte.gz")


def test_photos_of_mnist_digits_are_read_within_3_points_of_the_arrays(mnist_test_set, tmp_path):
    x, y = mnist_test_set
    model = fastnn.MLP([784, 128, 10], seed=0)
    fastnn.fit(model, x[:8000], y[:8000], epochs=8, lr=1e-3, optimizer="adam")  # MNIST's train set is not here
    rng = np.random.default_rng(0)
    held_out = np.arange(8000, 8400)
    prepared = []
    for i in held_out:
        (tmp_path / "p.jpg").write_bytes(photo(x[i].reshape(28, 28), rng))
        prepared.append(read_images(tmp_path / "p.jpg")[0][0])
    arrays = np.mean(model.predict(x[held_out]) == y[held_out])
    photos = np.mean(model.predict(np.array(prepared)) == y[held_out])
    print(f"accuracy: arrays {arrays:.4f}, photos {photos:.4f}")
    assert photos >= arrays - 0.03


def test_mnist_style_inverts_crops_scales_and_centres():
    img = np.full((100, 80), 230, np.uint8)  # light paper
    img[10:50, 60:70] = 20  # a dark bar, 40 x 10, near the top right
    out = mnist_style(img).reshape(28, 28).astype(float)
    rows, cols = np.nonzero(out > 0.25 * out.max())
    assert rows.max() - rows.min() + 1 == 20 and cols.max() - cols.min() + 1 in (5, 6)  # longer side 20
    cy = (np.arange(28) @ out.sum(axis=1)) / out.sum()
    cx = (np.arange(28) @ out.sum(axis=0)) / out.sum()
    assert abs(cy - 13.5) <= 0.5 and abs(cx - 13.5) <= 0.5  # centred by mass
    assert out[0, 0] == 0 and out.max() == 255  # light ink on black
    with pytest.raises(fastnn.DataError, match="no ink found"):
        mnist_style(np.full((10, 10), 200, np.uint8))


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "I;16"])
def test_pillow_modes_become_8_bit_luma(tmp_path, mode):
    a = np.zeros((8, 8), np.uint8)
    a[2:6, 2:6] = 200
    img = Image.fromarray(a)
    if mode == "I;16":
        img = Image.fromarray(a.astype(np.uint16) * 257)
    elif mode != "L":
        img = img.convert(mode)
    img.save(tmp_path / "x.png")
    g = read_image(tmp_path / "x.png")
    assert g.dtype == np.uint8 and g.shape == (8, 8) and g[3, 3] >= 199 and g[0, 0] == 0


def test_an_svg_saved_under_an_image_name_is_named_as_a_vector_drawing(tmp_path):
    p = tmp_path / "photo.png"
    p.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="28" height="28"><circle r="9"/></svg>')
    with pytest.raises(fastnn.DataError) as info:
        read_images(p)
    assert str(info.value) == (f"{p}: an SVG vector drawing, which fastnn does not read: export it as PNG "
                               f"(e.g. `rsvg-convert -w 280 {p} -o {p}.png`)")


def test_an_image_path_that_cannot_be_read_is_a_data_error(tmp_path):
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(fastnn.DataError, match="folder.png: cannot read"):
        read_image(tmp_path / "folder.png")
