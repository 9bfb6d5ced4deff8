"""Configuration: defaults ← YAML ← key=value overrides, type-checked; typos name the key."""
import pytest

from cliquecnn_ray.config import ConfigError, PipelineConfig, config_hash, load_config, to_dict


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 2\ntrain:\n  steps: 10\n  lr: 0.5\n")
    cfg = load_config(path, ["train.steps=20", "batches.lambda1=2", "sources=[a.mp4, b.mp4]"])
    assert cfg.rounds == 2 and cfg.train.steps == 20 and cfg.train.lr == 0.5
    assert cfg.batches.lambda1 == 2.0 and isinstance(cfg.batches.lambda1, float)
    assert cfg.sources == ("a.mp4", "b.mp4")
    assert cfg.neighbours == PipelineConfig().neighbours  # untouched sections keep their defaults


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'"),
        ("roundz=3", "unknown config key 'roundz'"),
        ("train.feature_layer=fc6", "moved to impute.feature_layer"),
        ("rounds=three", "config key 'rounds' wants an integer"),
        ("train.lr=fast", "config key 'train.lr' wants a number"),
        ("ingest.category_from_folder=7", "wants true/false"),
        ("train=3", "config key 'train' is a section"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_typo_in_yaml_names_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cliques:\n  num_clique: 5\n")
    with pytest.raises(ConfigError, match="cliques.num_clique"):
        load_config(path)


def test_shipped_configs_load_and_hash_is_stable():
    for name in ("configs/demo.yaml", "configs/fashion_mnist.yaml"):
        cfg = load_config(name)
        assert config_hash(cfg) == config_hash(load_config(name))
        assert to_dict(cfg)["run"].startswith("runs/")
    assert config_hash(load_config(None)) != config_hash(load_config(None, ["rounds=1"]))


def test_every_default_has_a_reason():
    """Each field of each config dataclass carries a why-comment on its line (sections excepted)."""
    import dataclasses
    import inspect
    import re

    from cliquecnn_ray import config

    classes = [c for c in vars(config).values() if inspect.isclass(c) and dataclasses.is_dataclass(c)]
    assert len(classes) >= 9
    for cls in classes:
        for line in inspect.getsource(cls).splitlines():
            match = re.match(r"^    (\w+): [^=]+ = (.*)$", line)
            if match and not match.group(2).endswith("Config()"):
                assert "#" in line, f"{cls.__name__}.{match.group(1)} has no reason: {line.strip()}"


@pytest.mark.parametrize(
    "override, key",
    [
        ("neighbours.k=0", "neighbours.k"),
        ("train.steps=-5", "train.steps"),
        ("rounds=-1", "rounds"),
        ("cliques.num_cliques=-3", "cliques.num_cliques"),
        ("impute.ltp_p=-1", "impute.ltp_p"),
        ("evaluate.knn_k=0", "evaluate.knn_k"),
        ("serve.threads=-1", "serve.threads"),
        ("resources.cpus_per_task=0", "resources.cpus_per_task"),
        ("train.lr=.nan", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("train.round_steps=[100, lots]", "train.round_steps[1]"),
        ("train.round_steps=[100, -1]", "train.round_steps[1]"),
        ("batches.p=-0.5", "batches.p"),
    ],
)
def test_values_out_of_range_are_refused_at_load_naming_the_key(override, key):
    import re

    with pytest.raises(ConfigError, match=re.escape(f"config key '{key}'")):
        load_config(None, [override])


def test_yaml_1_1_exponents_are_numbers(tmp_path):
    """YAML 1.1 reads 1e-3 (no dot) as a string; a float field takes it as the number it is."""
    assert load_config(None, ["train.lr=1e-3"]).train.lr == 0.001
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1e-3\n  round_steps: [1200, 400]\n")
    cfg = load_config(path)
    assert cfg.train.lr == 0.001 and cfg.train.round_steps == (1200, 400)


def test_fields_that_only_change_how_work_runs_leave_the_hash():
    from cliquecnn_ray.config import hashed_view

    base = config_hash(load_config(None))
    for override in ("neighbours.row_block=17", "neighbours.col_block=99", "neighbours.tile_rows=5",
                     "train.log_every=3", "train.checkpoint_every=7", "train.max_failures=9",
                     "impute.num_actors=4", "impute.batch_size=8", "features.batch_size=64",
                     "resources.cpus_per_task=2", "evaluate.memory_mb=64", "evaluate.queries_per_task=9",
                     "cliques.seeds_per_task=3"):
        assert config_hash(load_config(None, [override])) == base, override
    for override in ("neighbours.k=7", "seed=3", "train.lr=0.5", "cliques.num_cliques=3"):
        assert config_hash(load_config(None, [override])) != base, override
    assert "row_block" not in hashed_view(load_config(None).neighbours)


def test_a_field_added_later_enters_the_hash_only_when_set():
    """Runs committed before ``neighbours.anchor_round0`` existed keep their records; setting it redoes them."""
    from cliquecnn_ray.config import hashed_view

    assert "anchor_round0" not in hashed_view(load_config(None).neighbours)
    anchored = load_config(None, ["neighbours.anchor_round0=0.5"])
    assert hashed_view(anchored.neighbours)["anchor_round0"] == 0.5
    assert config_hash(anchored) != config_hash(load_config(None))
