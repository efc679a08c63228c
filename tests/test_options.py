"""One options dataclass per stage: the command's flags, the job file's table and the
library all take the same fields, checked by the same code."""
from __future__ import annotations

import dataclasses

import pytest
import typer.main

from cli import app
from pipeline.errors import UsageError
from pipeline.extract import ExtractOptions
from pipeline.finetune import FinetuneOptions, resolve_options
from pipeline.heads import FitOptions
from pipeline.jobs import JobFileError, load_job
from pipeline.jobs.spec import BACKBONE_KEYS, FINETUNE_KEYS, HEAD_KEYS
from pipeline.options import JOB_LEVEL, build

# (options class, the job file's table schema, keys only the table has, the CLI command)
STAGES = [
    (ExtractOptions, BACKBONE_KEYS, {"model"}, "extract"),
    (FitOptions, HEAD_KEYS, {"name"}, "fit-head"),
    (FinetuneOptions, FINETUNE_KEYS, {"from_head"}, "finetune"),
]

# A valid value other than the default for every field: a new field without one fails
# test_every_field_travels_from_the_job_file (add it here, and a flag for it).
SAMPLES = {
    ExtractOptions: {"weights": "none", "batch_size": 7, "workers": 1, "dtype": "float16", "layout": "imagefolder", "seed": 3,
                     "commit_every": 11, "commit_seconds": 5.5, "max_pixels": 1000, "amp": True, "engine": "eager", "precision": "bf16",
                     "decode": "draft", "gpu_decoder": "torchvision", "repair": True, "verify_content": True, "layers": ["layer3", "last4"], "token_pool": "cls+mean",
                     "path_col": "file", "label_col": "cls", "split_col": "part"},
    FitOptions: {"clf": "mlp", "C": 0.5, "workers": 2, "epochs": 3, "lr": 0.01, "weight_decay": 0.001, "batch_size": 16, "hidden": [8, 4],
                 "dropout": [0.1, 0.2], "label_smoothing": 0.1, "schedule": "step", "patience": 2, "class_weight": "balanced",
                 "val_fraction": 0.3, "seed": 4, "stream": True, "memory_budget": "512MiB", "k": [5, 10], "select_on": "val"},
    FinetuneOptions: {"head": "new", "unfreeze": "last:2", "augment": "light", "optimizer": "adamw", "lr_backbone": 0.001, "lr_head": 0.01,
                      "momentum": 0.5, "weight_decay": 0.01, "schedule": "step", "warmup": 0.2, "epochs": 2, "batch_size": 4, "accum": 2,
                      "clip_grad": 0.5, "label_smoothing": 0.1, "amp": False, "precision": "bf16", "channels_last": False, "seed": 5, "workers": 1},
}


def _table_fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if not f.metadata.get(JOB_LEVEL)}


@pytest.mark.parametrize("cls, schema, table_only, _", STAGES, ids=lambda x: getattr(x, "__name__", None))
def test_options_and_job_table_accept_the_same_keys(cls, schema, table_only, _):
    assert set(schema) == _table_fields(cls) | table_only
    job_level = {f.name for f in dataclasses.fields(cls) if f.metadata.get(JOB_LEVEL)}
    assert job_level <= {"device"}  # set once at the top of the job file


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def test_every_field_travels_from_the_job_file(tmp_path):
    """Each field, set in its table to a non-default value, arrives in the stage's options object."""
    (tmp_path / "data").mkdir()
    tables = {ExtractOptions: '[[backbones]]\nmodel = "resnet18"\n', FitOptions: "[[heads]]\n", FinetuneOptions: "[finetune]\n"}
    body = 'data = ["data"]\n'
    for cls, header in tables.items():
        assert set(SAMPLES[cls]) == _table_fields(cls), f"SAMPLES lacks {_table_fields(cls) - set(SAMPLES[cls])} of {cls.__name__}"
        body += header + "".join(f"{k} = {_toml(v)}\n" for k, v in SAMPLES[cls].items())
    (tmp_path / "job.toml").write_text(body)
    job = load_job(tmp_path / "job.toml")
    got = {ExtractOptions: job.backbones[0].options, FitOptions: job.heads[0].options, FinetuneOptions: job.finetune.options}
    for cls, options in got.items():
        for key, value in SAMPLES[cls].items():
            expected = getattr(cls(**{key: value}), key)  # the value as the class itself takes it
            assert getattr(options, key) == expected != getattr(cls(), key), (cls.__name__, key)


@pytest.mark.parametrize("cls, _, __, command", STAGES, ids=lambda x: getattr(x, "__name__", None))
def test_every_field_is_a_flag_of_its_command(cls, _, __, command):
    click_command = typer.main.get_command(app).commands[command]
    flags = {opt for p in click_command.params for opt in p.opts}
    for f in dataclasses.fields(cls):
        assert "--" + f.name.replace("_", "-") in flags, f"{command} has no flag for {cls.__name__}.{f.name}"


@pytest.mark.parametrize("make, needle", [
    (lambda: ExtractOptions(batch_size=0), "--batch-size must be at least 1"),
    (lambda: ExtractOptions(batch_size="big"), "--batch-size: expected an integer"),
    (lambda: ExtractOptions(commit_seconds=0), "--commit-seconds must be more than 0"),
    (lambda: ExtractOptions(decode="fast"), "--decode 'fast'"),
    (lambda: ExtractOptions(engine="tensorrt"), "choose one of auto, eager"),
    (lambda: ExtractOptions(device="gpu"), "--device 'gpu'"),
    (lambda: ExtractOptions(workers=-1), "--workers must be 0 or more"),
    (lambda: ExtractOptions(amp=1), "--amp: expected true or false"),
    (lambda: FitOptions(clf="svm"), "--clf 'svm': choose one of logreg"),
    (lambda: FitOptions(val_fraction=1.0), "--val-fraction must be in [0, 1)"),
    (lambda: FitOptions(hidden=(8, 0)), "--hidden sizes must be at least 1"),
    (lambda: FitOptions(C=0), "--C must be more than 0"),
    (lambda: FitOptions(memory_budget=-1), "--memory-budget"),
    (lambda: FinetuneOptions(warmup=1.0), "--warmup is a fraction in [0, 1)"),
    (lambda: FinetuneOptions(epochs=-1), "--epochs must be 0 or more"),
    (lambda: FinetuneOptions(unfreeze="some"), "use 'all' or 'last:N'"),
    (lambda: FinetuneOptions(optimizer="lion"), "--optimizer 'lion'"),
])
def test_bad_values_are_refused_naming_the_flag(make, needle):
    with pytest.raises(UsageError) as info:
        make()
    assert needle in str(info.value)


def test_build_takes_a_mapping_or_an_object_and_suggests_names():
    assert build(ExtractOptions, {"batch_size": 4}, workers=0) == ExtractOptions(batch_size=4, workers=0)
    base = FitOptions(clf="linear", epochs=3)
    assert build(FitOptions, base, seed=2) == FitOptions(clf="linear", epochs=3, seed=2)
    with pytest.raises(UsageError, match="did you mean 'batch_size'"):
        build(ExtractOptions, batchsize=4)
    assert FitOptions(dropout=[0.1, 0.2]).dropout == (0.1, 0.2)  # lists (TOML) become tuples: options stay hashable


def test_finetune_options_resolve_defaults_and_checkpoint():
    opts = resolve_options({"optimizer": "adamw", "epochs": 2})
    assert (opts.lr_backbone, opts.lr_head, opts.weight_decay, opts.epochs, opts.batch_size) == (1e-5, 1e-3, 0.05, 2, 32)
    previous = opts.training()
    assert "workers" not in previous and "device" not in previous  # how, not what: never part of a checkpoint
    resumed = resolve_options({"epochs": 4, "workers": 0}, previous)
    assert resumed.optimizer == "adamw" and resumed.epochs == 4 and resumed.workers == 0
    with pytest.raises(UsageError, match="differs from the checkpoint"):
        resolve_options({"batch_size": 8}, previous)


def test_job_table_unknown_key_is_suggested(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "job.toml").write_text('data = ["data"]\n[[backbones]]\nmodel = "resnet18"\nbatchsize = 4\n[[heads]]\nclf = "linear"\nepoch = 3\n')
    with pytest.raises(JobFileError) as info:
        load_job(tmp_path / "job.toml")
    assert "did you mean 'batch_size'" in str(info.value) and "did you mean 'epochs'" in str(info.value)


# ----------------------------------------------------------------------------- one normalisation rule


@pytest.mark.parametrize("make, field, canonical", [
    (lambda: ExtractOptions(weights="None"), "weights", "none"),
    (lambda: ExtractOptions(weights=" NONE "), "weights", "none"),
    (lambda: ExtractOptions(weights="default"), "weights", "DEFAULT"),
    (lambda: ExtractOptions(weights="imagenet1k_v2"), "weights", "IMAGENET1K_V2"),
    (lambda: ExtractOptions(weights="ResNet50_Weights.imagenet1k_v2"), "weights", "ResNet50_Weights.IMAGENET1K_V2"),
    (lambda: ExtractOptions(weights="My.pt"), "weights", "My.pt"),  # a path keeps its case
    (lambda: ExtractOptions(device="CPU"), "device", "cpu"),
    (lambda: ExtractOptions(device="Cuda:1"), "device", "cuda:1"),
    (lambda: ExtractOptions(dtype="Float16"), "dtype", "float16"),
    (lambda: ExtractOptions(layout="ImageFolder"), "layout", "imagefolder"),
    (lambda: ExtractOptions(engine="ONNXRuntime"), "engine", "onnxruntime"),
    (lambda: ExtractOptions(precision="BF16"), "precision", "bf16"),
    (lambda: ExtractOptions(decode="Draft"), "decode", "draft"),
    (lambda: FitOptions(clf="LogReg"), "clf", "logreg"),
    (lambda: FitOptions(clf="MLP"), "clf", "mlp"),
    (lambda: FitOptions(class_weight="Balanced"), "class_weight", "balanced"),
    (lambda: FitOptions(schedule="Step"), "schedule", "step"),
    (lambda: FitOptions(select_on="VAL"), "select_on", "val"),
    (lambda: FinetuneOptions(head="New"), "head", "new"),
    (lambda: FinetuneOptions(unfreeze="Last:2"), "unfreeze", "last:2"),
    (lambda: FinetuneOptions(augment="LIGHT"), "augment", "light"),
    (lambda: FinetuneOptions(optimizer="AdamW"), "optimizer", "adamw"),
    (lambda: FinetuneOptions(schedule="Constant"), "schedule", "constant"),
    (lambda: FinetuneOptions(device="CPU"), "device", "cpu"),
])
def test_name_like_values_are_read_case_insensitively_and_kept_canonical(make, field, canonical):
    assert getattr(make(), field) == canonical


def test_weights_spelled_any_way_name_one_cache(tmp_path):
    from pipeline.extract import default_cache_path

    names = {default_cache_path("resnet18", ExtractOptions(weights=w).weights, tmp_path) for w in ("none", "None", "NONE")}
    assert len(names) == 1 and "__none__" in next(iter(names)).name


def test_model_names_are_read_case_insensitively():
    from pipeline.backbones import check_model_name
    from pipeline.errors import BackboneError

    assert check_model_name("ResNet18") == "resnet18" and check_model_name("hub:Some/Repo:Entry") == "hub:Some/Repo:Entry"
    with pytest.raises(BackboneError, match="did you mean"):
        check_model_name("resnet19")


def test_job_file_values_follow_the_same_rule(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "job.toml").write_text('data = ["data"]\ndevice = "CPU"\n[[backbones]]\nmodel = "ResNet18"\nweights = "None"\n'
                                       '[[heads]]\nclf = "LogReg"\n')
    job = load_job(tmp_path / "job.toml")
    assert job.backbones[0].model == "resnet18" and job.backbones[0].options.weights == "none" and job.heads[0].options.clf == "logreg"


def test_cli_choices_are_case_insensitive_and_listed_in_help():
    from typer.testing import CliRunner

    runner = CliRunner()
    help_text = runner.invoke(app, ["fit-head", "--help"], env={"COLUMNS": "200"}).output
    assert "logreg|linear|mlp|knn" in help_text and "cv|val" in help_text
    assert "none|light|basic|rotate|strong" in runner.invoke(app, ["finetune", "--help"], env={"COLUMNS": "200"}).output
    result = runner.invoke(app, ["fit-head", "/nowhere/x.h5", "--clf", "LogReg", "--select-on", "VAL"])
    assert result.exit_code == 2 and "does not exist" in result.output  # the choices were accepted; the path was not
    result = runner.invoke(app, ["fit-head", "/nowhere/x.h5", "--clf", "svm"])
    assert result.exit_code == 2 and "svm" in result.output


@pytest.mark.parametrize("command", ["extract", "engines", "status", "run", "fit-head", "evaluate", "predict", "compare", "finetune", "models", "demo",
                                     "report", "audit", "export-model", "serve"])
def test_every_command_takes_quiet_and_json(command):
    names = {opt for p in typer.main.get_command(app).commands[command].params for opt in getattr(p, "opts", [])}
    assert {"--json", "--quiet", "-q"} <= names
