"""One experiment as a pydantic tree: YAML in, validated object out.

Each component owns its section; the algorithm section is a union discriminated by
`name`, with the classes defined beside each algorithm in `sfl_ray/algorithms/`. The algorithm
union, the model and data names and their plug-ins' `options` follow `sfl_ray.registry`: the
classes below are rebuilt whenever a plug-in registers (`_follow_registry`).
"""

from __future__ import annotations

import copy
import os
import re
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from sfl_ray import registry
from sfl_ray.algorithms import algorithm_config_classes
from sfl_ray.config_base import MAX_RATE, ConfigError, Section
from sfl_ray.job_files import resolve_config_path
from sfl_ray.metrics.keys import ROW_METRICS
from sfl_ray.models.lora import LoRAConfig

AlgorithmConfig = Annotated[
    Union[tuple(algorithm_config_classes(load_plugins=False))],  # type: ignore[misc]
    Field(discriminator="name"),
]


def _expand_home(path: Optional[str]) -> Optional[str]:
    # ~/data would otherwise be a folder literally named "~" (and never found).
    return os.path.expanduser(path) if path is not None and path.startswith("~") else path


class TransformerConfig(Section):
    pretrained: Optional[str] = Field(None, description="from_pretrained(name or local dir); None = build from "
                                      "the fields below with random init from the seed.")
    n_layer: int = Field(4, gt=1, description="Transformer blocks.")
    n_embd: int = Field(64, gt=0, description="Hidden size.")
    n_head: int = Field(4, gt=0, description="Attention heads.")
    n_positions: int = Field(128, gt=0, description="GPT-2: maximum sequence length (at least data.max_length).")
    patch_size: int = Field(4, gt=0, description="ViT: patch size in pixels.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout everywhere (0 keeps runs bit-reproducible).")
    attention: Literal["sdpa", "eager"] = Field("sdpa", description="Attention implementation.")

    @field_validator("pretrained")
    @classmethod
    def _home(cls, v: Optional[str]) -> Optional[str]:
        return _expand_home(v)


def _plugin_options(kind: str, name: Optional[str], value: Any) -> Any:
    """`model.options` / `data.options`: validated by the options class the plug-in registered
    with (its defaults when absent); built-ins, and plug-ins without one, take none."""
    if name is None:
        return None  # the name itself was refused: that is the error to report
    cls = registry.options_class(kind, name)
    if cls is None:
        if value is not None:
            raise ValueError(f"{kind} {name!r} takes no options")
        return None
    if value is None:
        return cls()
    return value if isinstance(value, cls) else cls.model_validate(value)


class ModelConfig(Section):
    """The network and its cut. Built-in models (`model.name`) and their default cut (`model.cut`,
    the last layer of the device block): cnn, a small CNN, cut pool2; simple_conv, the FSL-SAGE
    code's default (conv5x5-pool-LRN x2 on the device, 3 FC layers with N(0, 0.05²) init on the
    server), cut flatten (4096 activations on 32x32); resnet18, cut layer2 (see model.stem);
    vgg11, cut pool2; gpt2 (GPT2LMHeadModel) and vit (ViTForImageClassification) from
    `transformers`, cut blockK, by default block3 (at most n_layer - 1)."""

    # The names are the registry's (Literal of them, set by _follow_registry).
    name: str = Field("cnn", description="Architecture: one of the model zoo's, or a plug-in's (docs/extending.md).")
    cut: Optional[str] = Field(None, description="CNNs: last layer of the device block; transformers: blockK "
                               "(the device keeps the first K blocks); None = the model's default cut.")
    stem: Literal["cifar", "imagenet"] = Field("cifar", description="resnet18: cifar = 3x3 conv, no max-pool; "
                                               "imagenet = torchvision's 7x7/2 conv + BN + ReLU + 3x3/2 max-pool, "
                                               "as the SFL papers use on CIFAR (128x4x4 activations at layer2, a "
                                               "device block of 683,072 parameters, a server block of 10,498,570).")
    transformer: TransformerConfig = Field(TransformerConfig(), description="gpt2 / vit: shape or pretrained weights.")
    lora: Optional[LoRAConfig] = Field(None, description="gpt2 / vit: LoRA adapters on device, server and aux "
                                       "blocks; everything else frozen and never exchanged.")
    options: Optional[dict[str, Any]] = Field(
        None, validate_default=True, description="A plug-in model's own settings, validated by the options class "
        "it registered with (its defaults when absent); built-in models take none.")

    @field_validator("options", mode="wrap")
    @classmethod
    def _options(cls, v: Any, handler: Any, info: ValidationInfo) -> Any:
        return _plugin_options("model", info.data.get("name"), v)


class DataConfig(Section):
    """The data set (`data.name`): mnist (the 12k/2k subset built into the package, a folder of
    idx or parquet files, or a hub name such as ylecun/mnist), cifar10 (a tarball, an image folder
    or a hub name such as uoft-cs/cifar10), hf (any image-classification data set, by hub name or
    local folder), e2e (E2E NLG as causal language modelling; a 3,000-row slice is built in). A
    hub name is read with `datasets` and needs network access the first time (cached after)."""

    # The names are the registry's (Literal of them, set by _follow_registry).
    name: str = Field("mnist", description="Data source: a built-in one or a plug-in's (docs/extending.md).")
    path: Optional[str] = Field(
        None,
        description="mnist: folder of idx .gz files or parquet files, or a hub name (None = the built-in 12k "
        "subset); cifar10: a tarball of split/class/image files (packed once into parquet under "
        "~/.cache/sfl_ray), an image folder laid out the same way, or a hub name; hf: hub name or local "
        "folder/files; e2e: folder of E2E csv files or hub name (None = the built-in slice).",
    )
    image_column: str = Field("image", description="hf source: column holding the image.")
    label_column: str = Field("label", description="hf source: column holding the class label.")
    max_train_samples: Optional[int] = Field(None, gt=0, description="Use a fixed random subset of N training "
                                             "samples, the same for every seed (E2E: the first N rows).")
    max_test_samples: Optional[int] = Field(None, gt=0, description="Use a fixed random subset of N test samples, "
                                            "the same for every seed (E2E: the first N rows).")
    tokenizer: Optional[str] = Field(None, description="Text: a GPT-2 tokenizer folder (vocab.json + merges.txt or "
                                     "tokenizer.json) or hub name; None = the copy built into the package.")
    max_length: int = Field(128, gt=8, description="Text: tokens per example (truncated, right-padded).")
    augment: Literal["none", "crop_flip"] = Field("none", description="Client training batches only: crop_flip = "
                                                  "random crop (zero padding 4) + horizontal flip, per sample "
                                                  "(images; drawn from seed, round, client, epoch and batch).")
    options: Optional[dict[str, Any]] = Field(
        None, validate_default=True, description="A plug-in data source's own settings, validated by the options "
        "class it registered with (its defaults when absent); built-in sources take none.")

    @field_validator("options", mode="wrap")
    @classmethod
    def _options(cls, v: Any, handler: Any, info: ValidationInfo) -> Any:
        return _plugin_options("data", info.data.get("name"), v)

    @field_validator("path", "tokenizer")
    @classmethod
    def _home(cls, v: Optional[str]) -> Optional[str]:
        return _expand_home(v)


class PartitionConfig(Section):
    """How the training samples are split across clients."""

    name: Literal["iid", "dirichlet", "shards"] = Field("iid", description="iid; dirichlet: each client's "
                                                        "label mix ~ Dir(alpha); shards: label-sorted shards, "
                                                        "shards_per_client each.")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; smaller = more skewed.")
    shards_per_client: int = Field(2, gt=0, description="shards: label-sorted shards per client.")
    sizes: Literal["equal", "lognormal"] = Field(
        "equal", description="How many samples each client holds (iid, dirichlet): equal, or lognormal: in "
        "proportion to weights ~ LogNormal(0, size_sigma), at least one each (quantity skew).")
    size_sigma: float = Field(1.0, gt=0, description="sizes=lognormal: the spread of client sizes; larger = more "
                              "unequal (1.0: the largest of 100 clients holds about 10x the median).")
    field: Optional[str] = Field(None, description="Skew by this metadata field instead of the label (text data: "
                                 "E2E's eatType, food, area, ...); required for dirichlet/shards on language data.")


class TrainConfig(Section):
    """Local training: clients, sampling, optimizer, evaluation, precision."""

    num_clients: int = Field(10, gt=0, description="Number of (virtual) clients.")
    clients_per_round: Union[int, float] = Field(
        1.0, gt=0, description="Clients sampled per round: an int, or a fraction in (0, 1]."
    )
    batch_size: int = Field(32, gt=0, description="Mini-batch size on every client.")
    lr: float = Field(0.05, gt=0, le=MAX_RATE, description="Learning rate (client and server unless an algorithm "
                      "says otherwise); at most 1e38, beyond which float32 cannot hold it.")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="Optimizer on clients and servers.")
    optimizer_state: Literal["persist", "reset"] = Field(
        "persist", description="persist: every client, aux and server replica keeps its optimizer state (Adam "
        "moments, momentum) across rounds, as the reference codes do; reset: a fresh optimizer every round.")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0, le=MAX_RATE, description="L2 weight decay (at most 1e38, as lr).")
    local_epochs: int = Field(1, gt=0, description="Passes over the local data per round.")
    eval_every: int = Field(1, gt=0, description="Evaluate the global model every N rounds (and at the end).")
    eval_batch_size: int = Field(500, gt=0, description="Batch size for evaluation.")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="Forward passes (clients, server blocks, evaluation, Ray Train fits) under "
        "autocast: fp32 = none; bf16 = matmuls, convolutions and attention in bfloat16, while weights, "
        "gradients, optimizer state and link payloads stay float32, so bytes and FLOPs are those of fp32 (peak "
        "memory is measured as it is). fp16 is refused: it needs loss scaling. See the README's GPU section.")

    @field_validator("precision", mode="before")
    @classmethod
    def _no_fp16(cls, v: object) -> object:
        # float16 gradients underflow to zero without loss scaling, silently losing updates; the
        # algorithms own their losses and backward passes, and a scale would have to follow the
        # cut-layer gradient across the link, so the runtime cannot apply one for them.
        if v == "fp16":
            raise ValueError("fp16 needs loss scaling, which the runtime cannot apply to algorithms that own "
                             "their backward across the cut; use bf16 (float32's range, no scaling; CPUs and "
                             "Ampere or newer GPUs) or fp32")
        return v

    @model_validator(mode="after")
    def _fraction(self) -> "TrainConfig":
        c = self.clients_per_round
        if isinstance(c, float) and c > 1:
            raise ValueError(f"clients_per_round={c}: a fraction must be in (0, 1], or give an int")
        return self

    def sampled_count(self) -> int:
        """Number of clients sampled each round."""
        c = self.clients_per_round
        n = max(1, round(c * self.num_clients)) if isinstance(c, float) else int(c)
        return min(n, self.num_clients)


class ClusterConfig(Section):
    """Where it runs: the backend, and on Ray the actors and their resources."""

    backend: Literal["ray", "local"] = Field("ray", description="ray: actors; local: one process, serial (for pdb).")
    address: Optional[str] = Field(None, description="Ray address; None = the job's cluster, or a new local one.")
    num_pools: Optional[int] = Field(None, gt=0, description="Client pool actors, each hosting many virtual "
                                     "clients; None = fit the cluster's CPUs.")
    pool_cpus: float = Field(1.0, gt=0, description="CPUs reserved per client pool actor (> 0: with 0 the "
                             "cluster fit would start one pool per client).")
    client_gpus: float = Field(0.0, ge=0, le=1, description="GPU fraction per client pool actor (e.g. 0.25).")
    num_servers: int = Field(1, gt=0, description="Server block actors.")
    server_cpus: float = Field(1.0, ge=0, description="CPUs reserved per server block actor.")
    server_gpus: float = Field(0.0, ge=0, description="GPUs per server block actor (whole GPUs).")
    torch_threads: int = Field(1, gt=0, description="torch intra-op threads in every process (the same on both "
                               "backends, for identical numbers).")
    exchange: Literal["channels", "actor_calls", "in_pool"] = Field(
        "channels", description="The per-batch device<->server path: channels = a request/reply pipe pair in "
        "shared memory (runtime.pipe) between a pool and a server block on the same node, actor calls across "
        "nodes; actor_calls = a Ray actor call per request everywhere; in_pool = each server block lives in a "
        "client pool's process (as many pools as blocks, each with its pool's CPUs and the larger of "
        "client_gpus and server_gpus): a request is a function call, the fastest where device and server "
        "never compute at once (SL, SplitFed v2), but without overlap of the two where they could. The numbers are "
        "the same every way.")
    balance_pools: bool = Field(
        True, description="In a parallel round, a pool that has run its own clients takes clients not yet "
        "started from a busier pool, where the algorithm declares the program portable (FedAvg) and the client "
        "holds no state at its pool (e.g. plain SGD); the numbers are the same either way. false = each pool "
        "runs exactly its own clients (client c on pool c % num_pools).")
    task_timeout_s: Optional[float] = Field(
        None, gt=0, le=1e7, description="Deadline for any single wait on a remote call (s). None = proportionate "
        "to the work: 600 s until a client call has completed, then 10x the longest client call seen (at least "
        "60 s); a timeout names the round, the clients and the pool or server block.")
    storage_path: Optional[str] = Field(None, description="Ray Train storage (checkpoints of server fits); "
                                        "None = a temp folder (single node); on a multi-node cluster a shared path or URI.")

    @model_validator(mode="after")
    def _whole_server_gpus(self) -> "ClusterConfig":
        if self.server_gpus != int(self.server_gpus):
            raise ValueError(f"server_gpus={self.server_gpus}: server blocks take whole GPUs (0, 1, 2, ...)")
        return self


class CostModelConfig(Section):
    """The device and network profile that gives the simulated time `sim_s`: FLOPs over FLOP/s,
    bytes over bandwidth, plus latency per message."""

    device_flops_per_s: float = Field(1e10, gt=0, description="Sustained device FLOP/s (10 GFLOP/s: a phone-class CPU).")
    server_flops_per_s: float = Field(1e13, gt=0, description="Sustained server FLOP/s.")
    uplink_bytes_per_s: float = Field(1.25e6, gt=0, description="Device uplink (10 Mbit/s).")
    downlink_bytes_per_s: float = Field(6.25e6, gt=0, description="Device downlink (50 Mbit/s).")
    latency_s: float = Field(0.02, ge=0, description="One-way latency per message.")
    heterogeneity: Literal["none", "lognormal", "list"] = Field(
        "none", description="Per-client device profiles: none (all the default), lognormal (speed multipliers "
        "drawn per client from the seed), list (multipliers given per client, cycled).")
    sigma: float = Field(0.5, ge=0, description="lognormal: std of log(multiplier) for compute and for network.")
    compute_speed: Optional[list[float]] = Field(None, description="list: per-client multipliers of device FLOP/s.")
    network_speed: Optional[list[float]] = Field(None, description="list: per-client multipliers of bandwidth.")

    @model_validator(mode="after")
    def _lists(self) -> "CostModelConfig":
        if self.heterogeneity == "list" and not (self.compute_speed or self.network_speed):
            raise ValueError("heterogeneity=list needs compute_speed and/or network_speed")
        for v in (self.compute_speed or []) + (self.network_speed or []):
            if v <= 0:
                raise ValueError(f"speed multipliers must be > 0, got {v}")
        return self


class TargetMetric(Section):
    name: str = Field("eval_accuracy", description="A numeric key of the rows in metrics.jsonl: "
                      f"{', '.join(ROW_METRICS)}.")
    value: float = Field(..., description="Stop once the metric reaches this value.")
    mode: Literal["max", "min"] = Field("max", description="max: stop when metric >= value; min: when <= value.")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        # A misspelt name would never be found in a row, and the run would silently go on to stop.rounds.
        if v not in ROW_METRICS:
            raise ValueError(f"not a metric a run writes; allowed: {', '.join(ROW_METRICS)}")
        return v


class StopConfig(Section):
    """When a run stops: the first of these that is reached."""

    rounds: int = Field(10, gt=0, description="Number of rounds.")
    comm_budget_gib: Optional[float] = Field(None, gt=0, description="Stop once cumulative bytes exceed this (GiB).")
    target_metric: Optional[TargetMetric] = Field(None, description="Stop once this metric is reached.")


class LinkConfig(Section):
    """What the device<->server link counts, and how it encodes activations and gradients."""

    count_labels: bool = Field(True, description="Count labels (int64, 8 bytes each) as link bytes; false = the "
                               "FSL-SAGE reference code's accounting (labels move but are not counted).")
    compression: Literal["none", "fp16", "bf16", "int8"] = Field(
        "none", description="Compress activations (up) and cut-layer gradients (down) on the link; the "
        "compressed size is what is counted. fp16/bf16: 2 bytes a value (round to nearest even); int8: "
        "symmetric, 1 byte a value + a float32 scale per tensor or channel (link.int8_scale). Weights and "
        "labels are never compressed; none = bit-identical to no codec.")
    int8_scale: Literal["tensor", "channel"] = Field(
        "channel", description="int8 scale extent: one per tensor, or one per channel (dim 1 of a 4-D+ "
        "feature map, else the last dim: features of (B, F), hidden units of a transformer's (B, T, H)).")


class MetricsConfig(Section):
    """How much of the device cost is measured, and on which clients."""

    measure: Literal["exact", "sampled", "off"] = Field(
        "sampled", description="How device cost is measured. exact: every op of every client is observed "
        "(FLOPs and peak memory; +40% time on a CPU). sampled: FLOPs exact (each step's FLOPs measured once per "
        "program, batch shape and what varies per batch, and reused; a server block's steps likewise, once per "
        "request shape or per shapes a schedule call steps on); peak memory tracked on memory_clients clients of "
        "every memory_every-th round. off: nothing (device_flops, device_peak_mem_bytes, server_flops "
        "and sim_s are null, and rows and summary say measure: off).")
    memory_clients: int = Field(1, gt=0, description="sampled: clients per round whose device memory is tracked, "
                                "drawn from the seed among the round's clients holding at least one full batch.")
    memory_every: int = Field(1, gt=0, description="sampled: track memory in round 1 and every N-th round; the "
                              "other rows report device_peak_mem_bytes null (not measured).")

    @field_validator("measure", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


class OutputConfig(Section):
    """Where a run writes: <dir>/<name>/ (config.yaml, metrics.jsonl, summary.json, partition.json,
    checkpoints/)."""

    dir: str = Field("runs", min_length=1, description="Folder that holds run directories (a local folder or "
                     "a pyarrow.fs URI).")
    name: Optional[str] = Field(None, description="Run directory name, a plain folder name (no '/', '\\' or "
                                "'..'); None = <algorithm>-<data>-<model>-s<seed>.")
    overwrite: bool = Field(False, description="Reuse an existing non-empty run directory: its old content is "
                            "removed first. False = such a directory is refused (exit 2).")
    progress: bool = Field(True, description="Show a progress line per round on the driver.")
    checkpoint_every: int = Field(1, ge=0, description="Write a checkpoint (the whole experiment state) to "
                                  "<run dir>/checkpoints/ every N rounds and after the last; 0 = never.")
    keep_checkpoints: int = Field(2, gt=0, description="How many of the newest checkpoints to keep.")
    tensorboard: bool = Field(False, description="Also write each round's numeric metrics as TensorBoard scalars "
                              "(step = round) to <run dir>/tensorboard/; view with `tensorboard --logdir "
                              "<output.dir>`. Needs a local output.dir.")
    mlflow_uri: Optional[str] = Field(None, min_length=1, description="Also log the run to this MLflow tracking "
                                      "URI (e.g. http://host:5000, file:/path/mlruns): the flattened config as "
                                      "params, each round's numeric metrics (step = round), the summary's totals; "
                                      "experiment $MLFLOW_EXPERIMENT_NAME or 'sfl_ray', run name = the run "
                                      "directory's name. Needs pip install \"sfl_ray[mlflow]\". None = off.")

    @field_validator("tensorboard")
    @classmethod
    def _local_tensorboard(cls, v: bool, info: ValidationInfo) -> bool:
        if v and "://" in (info.data.get("dir") or ""):
            raise ValueError("TensorBoard event files need a local output.dir, not a storage URI")
        return v

    @field_validator("mlflow_uri")
    @classmethod
    def _mlflow_installed(cls, v: Optional[str]) -> Optional[str]:
        import importlib.util
        if v is not None and importlib.util.find_spec("mlflow") is None:
            from sfl_ray.metrics.tracking import MLFLOW_MISSING
            raise ValueError(MLFLOW_MISSING)
        return v

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: Optional[str]) -> Optional[str]:
        # The run directory must stay inside output.dir: no separators, no '..', nothing absolute.
        if v is not None and (v in ("", ".") or "/" in v or "\\" in v or ".." in v or "\0" in v):
            raise ValueError("a plain folder name inside output.dir (no '/', '\\', '..'; not empty)")
        return v


def _default_algorithm() -> Section:
    return registry.get("algorithm", "splitfed_v2", load=False).config_cls()


class ExperimentConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    partition: PartitionConfig = PartitionConfig()
    algorithm: AlgorithmConfig = Field(  # type: ignore[valid-type]
        default_factory=lambda: _default_algorithm(), description="The algorithm and its own parameters.")
    train: TrainConfig = TrainConfig()
    cluster: ClusterConfig = ClusterConfig()
    cost_model: CostModelConfig = CostModelConfig()
    link: LinkConfig = LinkConfig()
    metrics: MetricsConfig = MetricsConfig()
    stop: StopConfig = StopConfig()
    output: OutputConfig = OutputConfig()
    seed: int = Field(0, ge=0, description="Root seed of every random stream (init, data order, sampling).")

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> "ExperimentConfig":
        registry.load_plugins()  # the installed plug-ins' names and sections are valid too
        return super().model_validate(obj, *args, **kwargs)

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The JSON schema, with the installed plug-ins and every one registered so far."""
        registry.load_plugins()
        return super().model_json_schema(*args, **kwargs)

    def run_name(self) -> str:
        return self.output.name or f"{self.algorithm.name}-{self.data.name}-{self.model.name}-s{self.seed}"

    def run_dir(self) -> str:
        return f"{self.output.dir.rstrip('/')}/{self.run_name()}"


class DuplicateKey(yaml.YAMLError):
    """A mapping names the same key twice (PyYAML would silently keep the last one)."""

    def __init__(self, key: Any, first_line: int, line: int):
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first_line} and {line})")
        self.key, self.first_line, self.line = key, first_line, line


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that 1e-3 is a float (1.1 wants 1.0e-3, so it was the
    string "1e-3", which strict validation then refuses), and that a key given twice in one
    mapping is an error: PyYAML keeps the last one, so a second `cluster:` section would silently
    drop everything the first one set."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<:` merges are PyYAML's to resolve
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise DuplicateKey(key, seen[key], key_node.start_mark.line + 1)
                    seen[key] = key_node.start_mark.line + 1
                except TypeError:
                    continue  # an unhashable key: PyYAML's own error follows
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789."))


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars: 0.1 -> float, true -> bool, null -> None, [1,2] -> list."""
    return yaml.load(text, Loader=_Loader) if text != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b=c` overrides to a raw config dict (typing happens at validation)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, None, "an override is KEY=VALUE, e.g. train.lr=0.01")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(key, value, f"'{p}' is a value, not a section")
            node = nxt
        try:
            node[parts[-1]] = _parse_scalar(value)
        except yaml.YAMLError as exc:
            why = str(exc) if isinstance(exc, DuplicateKey) else f"not a YAML value ({exc.__class__.__name__})"
            raise ConfigError(key, value, why) from None
    # Switching algorithm.name drops the previous algorithm's own keys, so that
    # `--set algorithm.name=X` alone always works.
    algo = out.get("algorithm")
    if isinstance(algo, dict) and any(o.strip().startswith("algorithm.name=") for o in overrides):
        set_keys = {o.split("=", 1)[0].strip().split(".")[1] for o in overrides if o.strip().startswith("algorithm.")}
        out["algorithm"] = {k: v for k, v in algo.items() if k in set_keys}
    return out


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _key(e: dict) -> str:
    tags = set(registry.names("algorithm", load=False))
    return ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and (p in tags or _is_type_tag(p))))


def _first_error(err: ValidationError) -> ConfigError:
    errors = err.errors()
    # A union (int | float) fails once per member: say why the value is wrong, not which type it missed.
    same = [x for x in errors if _key(x) == _key(errors[0])]
    e = next((x for x in same if not x["type"].endswith("_type")), same[0])
    loc, value = _key(e), e.get("input")
    msg = e["msg"].removeprefix("Value error, ")
    if isinstance(value, bool) and e["type"] in ("int_type", "float_type"):
        msg = "expected a number, not a boolean"
    elif e["type"] in _BOUNDS:  # pydantic prints 1e38 with all its digits
        bound = next(iter(e.get("ctx", {}).values()), None)
        msg = f"must be {_BOUNDS[e['type']]} {bound:g}" if isinstance(bound, (int, float)) else msg
    elif e["type"] == "extra_forbidden":
        msg = "unknown key"
    elif e["type"] == "union_tag_invalid":
        msg = f"unknown algorithm; allowed: {', '.join(sorted(registry.names('algorithm', load=False)))}"
        value = e.get("input", {}).get("name") if isinstance(e.get("input"), dict) else value
        loc = loc + ".name" if not loc.endswith(".name") else loc
    elif e["type"] == "literal_error":
        msg = f"allowed: {e.get('ctx', {}).get('expected', '')}"
    if isinstance(value, dict):
        value = "{...}"
    return ConfigError(loc or "<root>", value, msg)


def _is_type_tag(part: str) -> bool:
    """pydantic names the member of a union that failed ('int', 'float', 'function-after[...]');
    that is not a key the user wrote."""
    return part in ("int", "float", "str", "bool", "none") or "[" in part


def load_config(path: Optional[str], overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Read a YAML job (a path, or a shipped job's name such as `quickstart`), apply overrides,
    validate. Raises ConfigError with one clear reason."""
    raw: dict = {}
    if path is not None:
        p = resolve_config_path(path)  # a file, or the name of a job shipped in the package
        try:
            raw = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader) or {}
        except UnicodeDecodeError as exc:
            raise ConfigError("--config", path, f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at "
                              f"offset {exc.start})") from None
        except DuplicateKey as exc:
            raise ConfigError("--config", path, str(exc)) from None
        except yaml.YAMLError as exc:
            raise ConfigError("--config", path, f"not valid YAML ({exc.__class__.__name__})") from None
        if not isinstance(raw, dict):
            raise ConfigError("--config", path, "the top level must be a mapping of sections")
    return validate_config(raw, overrides)


def validate_config(raw: dict, overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """A config from a dict of sections (as a YAML job reads), with `--set` style overrides.
    Raises ConfigError with one clear reason."""
    if not isinstance(raw, dict):
        raise ConfigError("<root>", type(raw).__name__, "the top level must be a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    registry.load_plugins()  # a broken plug-in is one line naming it
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise _first_error(err) from None


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML (every default spelled out)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def _follow_registry() -> None:
    """Make the registry-driven types match the registry: the algorithm union, the model and
    data names, and the union of the plug-ins' option classes (for the JSON schema and dumps;
    `_plugin_options` picks the class by name). Runs at import and after every registration."""
    global AlgorithmConfig
    algos = tuple(algorithm_config_classes(load_plugins=False))
    AlgorithmConfig = Annotated[Union[algos], Field(discriminator="name")]  # type: ignore[valid-type]
    field = ExperimentConfig.model_fields["algorithm"]
    field.annotation, field.discriminator = Union[algos], "name"  # type: ignore[assignment]
    for section, kind in ((ModelConfig, "model"), (DataConfig, "data")):
        section.model_fields["name"].annotation = Literal[tuple(registry.names(kind, load=False))]  # type: ignore
        options = tuple(dict.fromkeys(c for n in registry.names(kind, load=False)
                                      if (c := registry.options_class(kind, n)) is not None))
        section.model_fields["options"].annotation = (Optional[Union[options]] if options  # type: ignore
                                                       else Optional[dict[str, Any]])
        section.model_rebuild(force=True)
    ExperimentConfig.model_rebuild(force=True)


_follow_registry()
registry.on_change(_follow_registry)
