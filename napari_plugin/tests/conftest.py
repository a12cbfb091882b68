"""A tiny real run folder, made once per session through cellbg's own stages."""

from __future__ import annotations

import pytest

TINY = """
name: plugin-test
output: run
seed: 0
data:
  source: synthetic
  synthetic: {patients: 4, cells_per_patient: 12, cells_per_image: 4, image_size: 128, signal: 0.9, seed: 3}
segmentation: {method: masks}
crops: {size: 32, workers: 1}
variants:
  train: [original, only_fg]
  test: [original, only_fg, mixed_rand]
models:
  - {arch: resnet, depth: 10, width: 0.0625}
training: {epochs: 1, batch_size: 32, seeds: [0], split: {kind: kfold, folds: 2}, max_folds: 1}
saliency: {cells_per_job: 6, methods: [gradcam, occlusion], target: predicted, sanity_check: false,
           test_variants: [original, mixed_rand], occlusion_window: 8}
stats: {bootstrap: 50}
"""


@pytest.fixture(scope="session")
def plugin_run(tmp_path_factory):
    from cellbg import crops, saliency, segment, train
    from cellbg.protocol import load_protocol, write_resolved

    root = tmp_path_factory.mktemp("plugin")
    (root / "p.yaml").write_text(TINY)
    protocol = load_protocol(root / "p.yaml")
    write_resolved(protocol)
    segment.run_segmentation(protocol)
    crops.run_crops(protocol)
    train.run_training(protocol)
    train.collect_predictions(protocol.run_dir)
    saliency.run_saliency(protocol)
    return protocol.run_dir
