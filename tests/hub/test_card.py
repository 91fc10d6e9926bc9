"""Model cards (hub/card.py): front matter, results, the global explanation and the generated-card marker."""

from __future__ import annotations

from timm_qsenn.explain import global_explanation
from timm_qsenn.hub.card import is_generated_card

from .conftest import FEATURES, METRICS


def test_model_card_front_matter_results_and_global_explanation(saved):
    from huggingface_hub import ModelCard

    model, folder, _, _ = saved
    card = ModelCard.load(folder / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert {"timm", "q-senn", "timm_qsenn", "image-classification"} <= set(data.tags)
    assert data.datasets == ["cub200"]
    assert set(data.metrics) == set(METRICS)
    assert data.base_model == "timm/test_resnet.r160_in1k"
    text = card.text
    assert "import timm_qsenn" in text and 'timm.create_model("local-dir:' in text
    for key, value in METRICS.items():
        assert f"| {key} | {value:.4g} |" in text
    for cls in global_explanation(model).classes:
        name = cls.name.replace("|", "\\|")
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        for use in cls.features:
            assert f"{'+' if use.sign > 0 else '-'}{use.name}" in row
    for name in FEATURES:
        assert name in text
    assert is_generated_card((folder / "README.md").read_text())
    assert not is_generated_card((folder / "README.md").read_text().replace("Q-SENN", "QSENN", 1))
