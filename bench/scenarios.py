"""bench.scenarios: are `/v1/scenarios` samples draws from the simulator's law?

For `--contracts` held-out contracts (bench.common.held_out_contracts, seed fixed), ask the real
app over loopback for `--samples` draws of S_T and draw as many fresh Monte-Carlo samples from
the training simulator (the process's numba kernel and scheme, fresh normals); a two-sample
Kolmogorov-Smirnov test (scipy.stats.ks_2samp) compares them. A perfect model gives p-values
uniform on [0, 1]: mean 0.5, 1% of them below 0.01.

The model: `--store DIR` serves the served (promoted) version of an existing local store (e.g. the
one `bench.continuous --workdir` kept); without it, the bench trains the default config for
`--seconds` in-process and commits that.

    python -m bench.scenarios [--model bs|heston] [--store DIR | --seconds S] [--contracts 50]
        [--samples 10000] [--seed 1]

Output: one JSON line with ks_p_mean, ks_p_frac_below_0_01, sample_ms_p50 (per request,
end to end), the served version, and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from aiohttp.test_utils import TestServer
from scipy import stats

from bench.common import emit, held_out_contracts, machine
from config.settings import (
    LoggingSettings,
    ModelSettings,
    NamedModelSettings,
    ServerSettings,
    Settings,
    StoreSettings,
    TrainingSettings,
)
from server.app import create_app
from server.logging import configure_logging
from spectral_core.config import CoreConfig
from spectral_core.processes import get_process, qe
from spectral_core.processes.gbm import simulate_log_returns
from spectral_core.trainer import Trainer
from storage.chain import VersionChain
from storage.localstore import LocalStore
from storage.prefixed import ROOT_MODEL, model_store
from storage.promotion import SERVING_REF

# the model names this bench serves, and their processes
PROCESS = {"bs": "gbm", "heston": "heston"}


def log(msg: str) -> None:
    print(f"[scenarios] {msg}", file=sys.stderr, flush=True)


def core_config(model: str) -> CoreConfig:
    return CoreConfig(device="cpu", process=PROCESS[model])


async def train_store(store_dir: Path, seconds: float, model: str = "bs") -> None:
    """Train `model`'s default config for `seconds` and commit it as its served version."""
    chain = VersionChain(model_store(LocalStore(store_dir), model))
    trainer = Trainer(core_config(model))
    try:
        log(f"training the default model for {seconds:g} s")
        await asyncio.to_thread(trainer.train, seconds=seconds)
        record = await chain.commit(trainer.snapshot(), message="bench.scenarios",
                                    quality=trainer.quality().as_dict())
        await chain.set_ref(SERVING_REF, record.counter, actor="bench", action="promote")
    finally:
        trainer.close()


def mc_samples(cols: dict[str, np.ndarray], i: int, n: int, config: CoreConfig,
               seed: int) -> np.ndarray:
    """n fresh S_T from the training simulator (its scheme and step count): GBM's paths, or
    Heston's QE variance paths with x drawn from its conditional law given each path."""
    rng = np.random.default_rng([seed, i])
    theta = np.array([[cols[k][i] for k in get_process(config.process).request_fields]])
    z = rng.standard_normal((1, n, config.sim.timesteps))
    if config.process == "gbm":
        x = simulate_log_returns(theta, z, scheme=config.sim.scheme,
                                 moment_matching=config.sim.moment_matching,
                                 cap_bytes=config.memory.paths_bytes)
        return cols["X0"][i] * np.exp(x[0])
    ms2 = qe.simulate_heston_conditional(theta, z, cap_bytes=config.memory.paths_bytes,
                                         martingale_correction=config.sim.martingale_correction)
    x = qe.sample_log_returns(ms2, rng.standard_normal((1, n)),
                              cap_bytes=config.memory.paths_bytes)
    return cols["X0"][i] * np.exp(x[0])


async def run(args: argparse.Namespace, store_dir: Path) -> dict[str, Any]:
    config = core_config(args.model)
    named = {} if args.model == ROOT_MODEL else {
        args.model: NamedModelSettings(core=config, training=False)}
    settings = Settings(
        server=ServerSettings(max_scenario_samples=max(args.samples, 1)),
        store=StoreSettings(url=f"file://{store_dir}"),
        training=TrainingSettings(enabled=False),
        model=ModelSettings(poll_interval_s=1.0),
        models=named,
    )
    fields = ("X0", *get_process(config.process).request_fields)
    cols = held_out_contracts(args.contracts, config.domain, seed=20261203)
    p_values: list[float] = []
    latencies: list[float] = []
    version = None
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = str(server.make_url("/v1/scenarios"))
            for i in range(args.contracts):
                body = {
                    "contract": {k: float(cols[k][i]) for k in fields},
                    "n": args.samples,
                    "seed": args.seed + i,
                    "model": args.model,
                }
                t0 = time.perf_counter()
                async with session.post(url, json=body) as resp:
                    answer = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(f"/v1/scenarios answered {resp.status}: {answer}")
                latencies.append(time.perf_counter() - t0)
                version = answer["model"]["counter"]
                learned = np.asarray(answer["samples"], dtype=np.float64)
                mc = mc_samples(cols, i, args.samples, config, args.seed)
                p_values.append(float(stats.ks_2samp(learned, mc).pvalue))
    finally:
        await server.close()
    p = np.asarray(p_values)
    return {
        "bench": "scenarios",
        "model": args.model,
        "contracts": args.contracts,
        "samples": args.samples,
        "ks_p_mean": round(float(p.mean()), 4),
        "ks_p_frac_below_0_01": round(float(np.mean(p < 0.01)), 4),
        "ks_p_min": float(p.min()),
        "sample_ms_p50": round(float(np.median(latencies)) * 1e3, 2),
        "version": version,
        "machine": machine(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scenarios", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bs", choices=["bs", "heston"])
    parser.add_argument("--store", type=Path, default=None,
                        help="an existing local store directory to serve (default: train one)")
    parser.add_argument("--seconds", type=float, default=300.0,
                        help="training time when no --store is given")
    parser.add_argument("--contracts", type=int, default=50)
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if args.model not in PROCESS:
        parser.exit(2, f"bench.scenarios: no simulator here for model {args.model}\n")
    if args.contracts < 1 or args.samples < 2 or args.seconds <= 0:
        parser.exit(2, "bench.scenarios: --contracts >= 1, --samples >= 2, --seconds > 0\n")
    # the app's logs to stderr, warnings and up: stdout holds the result line alone
    configure_logging(LoggingSettings(level="WARNING", format="json"))
    with tempfile.TemporaryDirectory() as tmp:
        store_dir = args.store
        if store_dir is None:
            store_dir = Path(tmp) / "store"
            asyncio.run(train_store(store_dir, args.seconds, args.model))
        elif not store_dir.is_dir():
            parser.exit(2, f"bench.scenarios: --store {store_dir} is not a directory\n")
        emit(asyncio.run(run(args, store_dir.resolve())))


if __name__ == "__main__":
    main()
