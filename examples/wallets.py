"""Wallet top-ups and spends, applied exactly once per request id.

onceflow run wallets:app          # process (Ctrl-C commits and stops)
onceflow chaos wallets:app        # kill it again and again, then audit the effects
"""

from onceflow import App, State

app = App("wallets", store="wallets.db", partitions=4)


def apply(request: dict, wallet: State) -> list[dict]:
    balance = wallet.get(0)
    if balance + request["amount"] < 0:
        return [{"id": request["id"], "ok": False, "balance": balance}]
    wallet.value = balance + request["amount"]
    return [{"id": request["id"], "ok": True, "balance": wallet.value}]


(
    app.source("requests")  # keyed by wallet id, so each wallet lives on one partition
    .dedupe(name="request-ids", key=lambda r: r["id"], ttl=7 * 24 * 3600)
    .process(name="wallets", fn=apply)
    .to("results")
)


def chaos_events(n: int, seed: int):  # used by `onceflow chaos wallets:app`
    import random

    from onceflow.testing import Event

    rng = random.Random(seed)
    for i in range(n):
        wallet = f"w{rng.randrange(40)}"
        req = {"id": f"r{i}", "wallet": wallet, "amount": rng.randint(-60, 100)}
        yield Event("requests", req, key=wallet, id=req["id"])
        if rng.random() < 0.05:  # a client retry from a new session
            yield Event("requests", req, key=wallet, id=req["id"], producer="retry")
