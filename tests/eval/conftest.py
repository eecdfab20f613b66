import pytest


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Tiny Mask2Former / CLIP / BLIP VQA directories, built once per test session."""
    from tests.eval._tiny import save_tiny_blip_vqa, save_tiny_clip, save_tiny_mask2former

    root = tmp_path_factory.mktemp("eval_models")
    return {"detector": save_tiny_mask2former(root / "m2f"), "clip": save_tiny_clip(root / "clip"),
            "blip": save_tiny_blip_vqa(root / "blip")}


def write_png(path, rgb=(255, 0, 0), size=(40, 32)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(str(path))
    return path


def write_corrupt_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    return path
