"""CPU (and GPU where present) speed of the network: ms per face at batch 1, faces/s at batch 32.

    python benchmarks/bench_speed.py [--config hih_cpu] [--threads 2]

Times the network plus decode on face crops (the part that scales with faces), after warm-up, as the
median of repeated runs, and counts parameters and FLOPs. Prints a table, writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the product sets it (hih_cli.py); before torch

from common import print_table, write_results


def flops(model, size: int) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops()


def time_batches(model, geo, batch: int, repeats: int, device) -> float:
    import torch

    from model.codec import decode

    x = torch.randn(batch, 3, model.config.input_size, model.config.input_size, device=device)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model(x)
            decode(out["integer"][-1], out["decimal"], geo)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["hih_cpu", "hih_t", "hih_b"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    import torch

    from model.codec import Geometry
    from model.config import get_config
    from model.network import HIHNet, count_parameters

    torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for name in args.configs:
        cfg = get_config(name)
        model = HIHNet(cfg).eval()
        geo = Geometry(cfg.input_size, cfg.heatmap_size, cfg.decimal_size)
        gflops = flops(model, cfg.input_size) / 1e9
        for dev in devices:
            model.to(dev)
            big = name != "hih_cpu" and dev.type == "cpu"
            b1 = time_batches(model, geo, 1, max(5, args.repeats // (5 if big else 1)), dev)
            b32 = time_batches(model, geo, 32, max(3, args.repeats // (10 if big else 3)), dev)
            rows.append({
                "config": name, "device": dev.type, "threads": args.threads if dev.type == "cpu" else None,
                "params_M": count_parameters(model) / 1e6, "GFLOPs": gflops, "input": cfg.input_size,
                "ms_per_face_b1": 1000 * b1, "faces_per_s_b32": 32 / b32,
            })
            print_table([rows[-1]], list(rows[-1]))
    print_table(rows, list(rows[0]), title="Network speed (forward + decode, median)")
    load = os.getloadavg()
    print(f"load average during the run: {load[0]:.2f} (other processes share these cores; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')})")
    write_results("speed", {"rows": rows, "load_average": load, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
                  "python benchmarks/bench_speed.py")


if __name__ == "__main__":
    main()
