"""The exception tree. Every error names the action an operator should take.

OnceflowError
├── ConfigError          invalid settings or arguments; fix them and start again
│   ├── MissingExtraError  an optional dependency is not installed
│   └── OutOfOrderSequenceError  an explicit sequence= does not follow the stored ones
├── TopologyError        the pipeline is malformed or changed over existing state
├── SinkGuaranteeError   an exactly-once App was given a weaker sink
├── StoreError           the store failed or holds something unexpected
│   └── FencedError      another process took over this app's partitions
│       └── ProducerFencedError  a newer Producer of this producer_id opened (embedded)
├── UnavailableError     a broker, database or API is unreachable; retried by onceflow
├── CommitError          a checkpoint failed; the App rewinds to the last commit
└── UserFunctionError    a user function raised while on_error="stop"
"""

from __future__ import annotations


class OnceflowError(Exception):
    """Root of every error onceflow raises on purpose."""


class ConfigError(OnceflowError):
    """A setting or argument is invalid. The message says what to change."""


class MissingExtraError(ConfigError):
    """An optional integration is used without its extra installed."""

    def __init__(self, extra: str, module: str) -> None:
        super().__init__(
            f"the {extra} integration needs the '{module}' package, which is not installed. "
            f"Operator action: pip install 'onceflow[{extra}]'"
        )
        self.extra = extra


class OutOfOrderSequenceError(ConfigError):
    """An explicit `sequence=` is neither the next one for its producer id and partition
    nor a re-send of the very record stored under it. Nothing of the send was written."""


class TopologyError(OnceflowError):
    """The dataflow is malformed, or differs from the one that wrote the existing state."""


class SinkGuaranteeError(OnceflowError):
    """A sink's declared guarantee is weaker than the App's."""


class StoreError(OnceflowError):
    """The store failed in a way onceflow does not retry on its own."""


class FencedError(StoreError):
    """A newer process owns the partitions; this one must stop without committing."""


class ProducerFencedError(FencedError):
    """A newer `Producer` with the same `producer_id` was opened on the embedded log (a
    second replica, or a restart). The fenced send was not stored; this Producer sends
    nothing more."""

    def __init__(self, producer_id: str, detail: str) -> None:
        super().__init__(
            f"producer '{producer_id}' was fenced: {detail}. Operator action: give each "
            "concurrently running sender its own producer_id; a process that should go on "
            "sending opens a new Producer, and re-sends what was not acknowledged (with its "
            "id=, so that a dedupe step drops any copy)"
        )
        self.producer_id = producer_id


class UnavailableError(OnceflowError):
    """A system onceflow depends on (the broker, a database, an outside API) cannot be
    reached right now. Nothing is lost: the App waits with backoff and resumes by itself;
    this is raised to a caller only where waiting is not possible."""


class CommitError(OnceflowError):
    """A checkpoint did not commit. State and positions were rewound to the last commit."""


class UserFunctionError(OnceflowError):
    """A user function raised and the App runs with on_error='stop'."""

    def __init__(self, step: str, topic: str, partition: int, offset: int, cause: BaseException):
        super().__init__(
            f"step '{step}' raised {type(cause).__name__}: {cause} "
            f"(input {topic}[{partition}]@{offset}). Nothing from this epoch was committed; "
            "operator action: fix the function or run with on_error='dead-letter'"
        )
        self.step = step
        self.topic = topic
        self.partition = partition
        self.offset = offset
