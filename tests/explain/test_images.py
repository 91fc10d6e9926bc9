import torch

from timm_qsenn.explain import heatmap_overlay


def test_heatmap_overlay_keeps_cold_pixels_and_colours_hot_ones():
    image = torch.full((3, 4, 4), 0.5)
    heat = torch.zeros(4, 4)
    heat[1, 2] = 3.0
    out = heatmap_overlay(image, heat)
    assert torch.equal(out[:, 0, 0], image[:, 0, 0])
    assert out[0, 1, 2] > 0.6 and out[2, 1, 2] < 0.4  # hottest pixel turns red
