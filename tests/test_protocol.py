"""The protocol schema: defaults, unknown keys, types, line numbers, paths."""

from pathlib import Path

import pytest
import yaml

from cellbg._checks import CellbgError
from cellbg.protocol import (
    XIAO_VARIANTS,
    Protocol,
    load_protocol,
    load_run,
    parse_protocol,
    protocol_hash,
    resolved_yaml,
    write_resolved,
)

REPO = Path(__file__).resolve().parents[1]


def test_minimal_protocol_fills_every_default():
    p = parse_protocol("name: demo\n")
    assert p.data.source == "synthetic"
    assert p.crops.size == 64
    assert p.variants.test == list(XIAO_VARIANTS)
    assert p.models[0].arch == "resnet" and p.models[0].key == "resnet"
    assert p.stats.alpha == 0.05
    assert p.executor.kind == "local"
    # every section is present in the resolved YAML, and it round-trips
    resolved = yaml.safe_load(resolved_yaml(p))
    for section in (
        "data",
        "segmentation",
        "crops",
        "variants",
        "models",
        "training",
        "saliency",
        "stats",
        "executor",
        "report",
    ):
        assert section in resolved
    assert Protocol.model_validate(resolved) == p


def test_name_is_required():
    with pytest.raises(CellbgError, match=r"name: required key is missing"):
        parse_protocol("data:\n  source: synthetic\n", source="p.yaml")


def test_unknown_key_names_path_line_and_suggestion():
    text = "name: x\ncrops:\n  size: 32\n  sise: 64\n"
    with pytest.raises(CellbgError) as exc:
        parse_protocol(text, source="p.yaml")
    msg = str(exc.value)
    assert msg == "p.yaml:4: crops.sise: unknown key 'sise' (did you mean 'size'?)"


def test_wrong_type_names_key_and_line():
    text = "name: x\ntraining:\n  seeds: [0, 1]\n  epochs: many\n"
    with pytest.raises(CellbgError) as exc:
        parse_protocol(text, source="p.yaml")
    line = str(exc.value)
    assert line.startswith("p.yaml:4: training.epochs:") and "integer" in line and "'many'" in line


def test_every_problem_gets_its_own_line():
    text = "name: x\ncrops:\n  size: -3\nstats:\n  alpah: 0.1\n"
    with pytest.raises(CellbgError) as exc:
        parse_protocol(text, source="p.yaml")
    lines = str(exc.value).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("p.yaml:3: crops.size:")
    assert lines[1].startswith("p.yaml:5: stats.alpah: unknown key")


def test_model_union_errors_point_into_the_list():
    text = "name: x\nmodels:\n  - arch: resnet\n    depth: 18\n  - arch: resnet\n    label: big\n    dept: 34\n"
    with pytest.raises(CellbgError) as exc:
        parse_protocol(text, source="p.yaml")
    assert str(exc.value) == "p.yaml:7: models.1.dept: unknown key 'dept' (did you mean 'depth'?)"


def test_unknown_architecture_is_an_error():
    with pytest.raises(CellbgError, match=r"p.yaml:3: models.0"):
        parse_protocol("name: x\nmodels:\n  - arch: vgg\n", source="p.yaml")


def test_duplicate_model_names_rejected():
    text = "name: x\nmodels:\n  - {arch: resnet}\n  - {arch: resnet, depth: 34}\n"
    with pytest.raises(CellbgError, match="distinct 'label'"):
        parse_protocol(text)


def test_not_yaml_and_not_a_mapping():
    with pytest.raises(CellbgError, match=r"p.yaml:2: not valid YAML"):
        parse_protocol("name: x\n  bad: [\n", source="p.yaml")
    with pytest.raises(CellbgError, match="a protocol is a mapping"):
        parse_protocol("- a\n- b\n", source="p.yaml")


def test_comparison_condition_format():
    with pytest.raises(CellbgError, match="train_variant:test_variant"):
        parse_protocol("name: x\nstats:\n  confirmatory:\n    - {a: original, b: 'original:only_fg'}\n")


def test_default_confirmatory_follows_the_variants():
    bg_gap = [("original:mixed_rand", "original:mixed_same")]
    only_fg_drop = [("original:original", "original:only_fg")]

    def confirmatory(text):
        return [(c.a, c.b) for c in parse_protocol("name: x\n" + text).stats.confirmatory]

    assert confirmatory("") == bg_gap  # Xiao's eight test variants by default
    assert confirmatory("variants: {test: [original, only_fg, mixed_rand, mixed_same]}\n") == bg_gap
    assert confirmatory("variants: {test: [original, only_fg, mixed_same]}\n") == only_fg_drop
    assert confirmatory("variants: {train: [original, only_fg], test: [original, only_fg]}\n") == only_fg_drop
    # neither comparison can be computed when original is not trained (or original / only_fg not
    # tested): no confirmatory test rather than one that fails at the stats stage after training
    assert confirmatory("variants: {train: [only_fg]}\n") == []
    assert confirmatory("variants: {test: [original, no_fg]}\n") == []
    explicit = "stats: {confirmatory: [{a: 'original:original', b: 'only_fg:only_fg'}]}\n"
    assert confirmatory(explicit) == [("original:original", "only_fg:only_fg")]
    # the choice is written into the resolved protocol, so a run keeps it
    p = parse_protocol("name: x\n")
    assert yaml.safe_load(resolved_yaml(p))["stats"]["confirmatory"] == [{"a": a, "b": b} for a, b in bg_gap]


def test_paths_are_relative_to_protocol_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "imgs").mkdir()
    pfile = tmp_path / "sub" / "p.yaml"
    pfile.write_text("name: x\noutput: out\ndata:\n  source: folders\n  root: ../imgs\n")
    p = load_protocol(pfile)
    assert p.output == (tmp_path / "sub" / "out").resolve()
    assert p.data.root == (tmp_path / "imgs").resolve()


def test_missing_data_folder_names_key_and_line(tmp_path):
    pfile = tmp_path / "p.yaml"
    pfile.write_text("name: x\ndata:\n  source: folders\n  root: nowhere\n")
    with pytest.raises(CellbgError) as exc:
        load_protocol(pfile)
    assert str(exc.value).startswith(f"{pfile}:4: data.root: path does not exist:")


def test_folders_source_needs_root():
    with pytest.raises(CellbgError, match="needs data.root"):
        parse_protocol("name: x\ndata:\n  source: folders\n")


def test_missing_protocol_file(tmp_path):
    with pytest.raises(CellbgError, match="protocol file not found"):
        load_protocol(tmp_path / "none.yaml")


def test_hash_is_stable_and_sensitive():
    a = parse_protocol("name: x\n")
    b = parse_protocol("name: x\ncrops:\n  size: 64\n")  # the default, spelled out
    c = parse_protocol("name: x\ncrops:\n  size: 32\n")
    assert protocol_hash(a) == protocol_hash(b)
    assert protocol_hash(a) != protocol_hash(c)
    assert protocol_hash(a, section="models") == protocol_hash(c, section="models")
    assert protocol_hash(a, section="crops") != protocol_hash(c, section="crops")


def test_write_resolved_and_load_run(tmp_path):
    pfile = tmp_path / "p.yaml"
    pfile.write_text("name: x\noutput: run\ntraining:\n  epochs: 3\n")
    p = load_protocol(pfile)
    path = write_resolved(p)
    assert path == tmp_path / "run" / "protocol.resolved.yaml"
    assert f"protocol_hash: {protocol_hash(p)}" in path.read_text()
    assert load_run(tmp_path / "run") == p
    with pytest.raises(CellbgError, match="not a cellbg run folder"):
        load_run(tmp_path)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "protocols").glob("*.yaml")))
def test_shipped_protocols_validate(name):
    p = load_protocol(REPO / "protocols" / name, check_paths=False)
    assert p.name


def test_atomic_writes_keep_the_old_file_on_failure_and_use_the_umask(tmp_path):
    import os
    import stat

    from cellbg._io import atomic_dir, atomic_path, write_text_atomic

    target = write_text_atomic(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temporary left behind
    mask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "b.txt", "x")
        with atomic_dir(tmp_path / "store") as d:
            (d / "f").write_text("y")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "store").stat().st_mode) == 0o755
    assert (tmp_path / "store" / "f").read_text() == "y"


def test_a_run_folder_written_before_the_threshold_rename_still_loads(tmp_path):
    """Runs whose resolved protocol says segmentation.threshold.method stay readable."""
    from cellbg.protocol import load_run

    run = tmp_path / "run"
    run.mkdir()
    resolved = {"name": "old", "segmentation": {"method": "threshold", "threshold": {"method": "otsu"}}}
    (run / "protocol.resolved.yaml").write_text(yaml.safe_dump(resolved))
    protocol = load_run(run)
    assert protocol.segmentation.threshold.threshold == "otsu"
    # a user's own protocol with the old key is still refused with the new name
    with pytest.raises(CellbgError, match="renamed segmentation.threshold.threshold"):
        parse_protocol(yaml.safe_dump(resolved))


def test_saliency_test_variants_list_and_the_one_variant_alias():
    p = parse_protocol("name: x\nsaliency:\n  test_variants: [original, mixed_rand]\n")
    assert p.saliency.test_variants == ["original", "mixed_rand"]
    old = parse_protocol("name: x\nsaliency:\n  test_variant: mixed_rand\n")  # the older single key
    assert old.saliency.test_variants == ["mixed_rand"] and old.saliency.test_variant == "mixed_rand"
    assert "test_variant:" not in resolved_yaml(old).replace("test_variants:", "")  # written as the list
    with pytest.raises(CellbgError, match="either test_variants"):
        parse_protocol("name: x\nsaliency:\n  test_variant: original\n  test_variants: [original]\n")
    with pytest.raises(CellbgError, match=r"saliency.test_variants.*did you mean 'mixed_rand'"):
        parse_protocol("name: x\nsaliency:\n  test_variants: [mixed_rnd]\n")
    with pytest.raises(CellbgError, match=r"\['mixed_rand'\] are not in variants.test"):
        parse_protocol("name: x\nvariants: {test: [original]}\nsaliency:\n  test_variants: [original, mixed_rand]\n")
    # the default ['original'] becomes the first tested variant when original is not tested
    assert parse_protocol("name: x\nvariants: {test: [only_fg]}\n").saliency.test_variants == ["only_fg"]
