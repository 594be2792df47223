"""onceflow: stream processing with an end-to-end exactly-once guarantee.

from onceflow import App

app = App("payments", store="payments.db")
(app.source("transfers")
    .dedupe(name="payment-ids", key=lambda t: t["id"], ttl=7 * 86400)
    .process(name="balances", fn=apply_transfer)
    .to("ledger"))
app.run()
"""

from ._app import App, RunStats
from ._consumer import Consumer
from ._dataflow import Stream
from ._effects import EffectSink, HttpEffectSink, PermanentError
from ._errors import (
    CommitError,
    ConfigError,
    FencedError,
    MissingExtraError,
    OnceflowError,
    OutOfOrderSequenceError,
    ProducerFencedError,
    SinkGuaranteeError,
    StoreError,
    TopologyError,
    UnavailableError,
    UserFunctionError,
)
from ._hooks import Hooks
from ._postgres_sink import PostgresSink
from ._producer import Producer
from ._records import Record, SendResult
from ._sinks import CallbackSink, FileSink, Sink, SQLiteTableSink
from ._state import State

__version__ = "0.1.0"

__all__ = [
    "App",
    "CallbackSink",
    "CommitError",
    "ConfigError",
    "Consumer",
    "EffectSink",
    "FencedError",
    "FileSink",
    "Hooks",
    "HttpEffectSink",
    "MissingExtraError",
    "OnceflowError",
    "OutOfOrderSequenceError",
    "PermanentError",
    "PostgresSink",
    "Producer",
    "ProducerFencedError",
    "Record",
    "RunStats",
    "SQLiteTableSink",
    "SendResult",
    "Sink",
    "SinkGuaranteeError",
    "State",
    "StoreError",
    "Stream",
    "TopologyError",
    "UnavailableError",
    "UserFunctionError",
]
