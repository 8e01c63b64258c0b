import logging

import numpy as np
from PIL import Image

from kzoo.data.folder import image_folder


def test_an_unreadable_image_is_skipped_once_by_name(tmp_path, caplog):
    """The next readable image stands in, and the only warning names the file: timm hands over the
    bytes undecoded, so it neither skips the file itself nor warns by index."""
    for label, value in (("a", 10), ("b", 200)):
        (tmp_path / "val" / label).mkdir(parents=True)
        Image.fromarray(np.full((6, 5), value, np.uint8)).save(tmp_path / "val" / label / "1.png")
    broken = tmp_path / "val" / "a" / "0.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    dataset = image_folder(tmp_path, "val", input_img_mode="L")
    with caplog.at_level(logging.WARNING):
        image, label = dataset[0]
    assert (image.mode, image.size, image.getpixel((0, 0)), label) == ("L", (5, 6), 10, 0)
    assert [r.getMessage() for r in caplog.records] == [f"skipped unreadable image {broken}"]
    assert dataset[2][1] == 1 and len(dataset) == 3
