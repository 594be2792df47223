"""Test, bench and chaos infrastructure for onceflow: real servers run on loopback.

Not part of the installed library. Each controller lives in its own module
(``infra.kafka_broker``) and imports its client library lazily, so importing one never
requires another's dependencies.
"""
