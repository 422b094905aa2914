"""tools/measure_360.py: the 360° measurement of issue 18 (docs/BACK_OF_HEAD.md) scores what the product scores."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "measure_360.py"


def load_tool():
    spec = importlib.util.spec_from_file_location("measure_360", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_source_view_target_is_the_photo_on_white_once():
    """The preprocess composites the photo on its background (white here), so the target is that image as it is.

    The tool once composited it on white a second time, ``img * m + (1 - m)``, which brightened every soft-matte rim
    pixel (lp_s5: 11.7 % of the frame, by up to 0.2) and turned completion's opaque hair rim into a false 1.25 dB
    drop of the source view."""
    torch.manual_seed(0)
    fg = torch.rand(3, 16, 16) * 0.5
    matte = torch.linspace(0, 1, 16).expand(16, 16)[None].clone()  # a soft ramp, as at a hair rim
    image = fg * matte + (1 - matte)  # what the preprocess writes: composited on white
    target = load_tool().source_view_target(SimpleNamespace(image=image, matte=matte))
    assert target.shape == (16, 16, 3)
    np.testing.assert_allclose(target, image.permute(1, 2, 0).numpy(), atol=1e-6)
    soft = (matte[0] > 0.2) & (matte[0] < 0.8)
    double = (image * matte + (1 - matte)).permute(1, 2, 0).numpy()
    assert (double - target)[soft.numpy()].mean() > 0.05  # the old target differs where the matte is soft


def test_source_view_target_undoes_a_coloured_background():
    """On a grey preprocess background the target is the photo on white, as the pixel guard measures it."""
    fg = torch.full((3, 8, 8), 0.2)
    matte = torch.zeros(1, 8, 8)
    matte[:, 2:6, 2:6] = 1.0
    image = fg * matte + 0.5 * (1 - matte)
    target = load_tool().source_view_target(SimpleNamespace(image=image, matte=matte))
    assert np.allclose(target[0, 0], 1.0) and np.allclose(target[3, 3], 0.2)
