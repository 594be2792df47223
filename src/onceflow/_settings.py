"""One settings object, read from ONCEFLOW_* environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from ._errors import ConfigError

ENV_HELP = {
    "ONCEFLOW_STORE": "store of Apps, producers and the CLI (default: onceflow.db)",
    "ONCEFLOW_COMMIT_INTERVAL": "most seconds between commits while records flow; an App "
    "that has caught up commits at once (default: 0.1)",
    "ONCEFLOW_COMMIT_EVERY": "commit after this many input records at most (default: 20000)",
    "ONCEFLOW_MAX_BATCH": "records per poll (default: 5000)",
    "ONCEFLOW_PARTITIONS": "partitions of topics an App creates (default: 1)",
    "ONCEFLOW_WORKER": "Kafka: this worker's slot, its stable transactional id (default: 0)",
    "ONCEFLOW_STATE_DIR": "Kafka: where local state stores live (default: .onceflow-state)",
    "ONCEFLOW_CRASH_AT": "test only: SIGKILL self at a protocol step, e.g. before_commit:3",
    "ONCEFLOW_CHAOS_POSTGRES_URL": "test only, set by `onceflow chaos --postgres`: every "
    "PostgresSink writes to this database instead of its own URL",
}


@dataclass(frozen=True)
class Settings:
    store: str = "onceflow.db"
    commit_interval: float = 0.1
    commit_every: int = 20_000
    max_batch: int = 5_000
    partitions: int = 1
    worker: int = 0
    state_dir: str = ".onceflow-state"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ) if env is None else env
        values: dict[str, object] = {}
        for f in fields(cls):
            var = f"ONCEFLOW_{f.name.upper()}"
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            kind = type(getattr(cls, f.name))
            try:
                values[f.name] = kind(raw)
            except ValueError as exc:
                raise ConfigError(f"{var}={raw!r} is not a valid {kind.__name__}") from exc
        return cls(**values)  # type: ignore[arg-type]
