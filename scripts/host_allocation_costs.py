"""What an offloaded cache's host memory costs to allocate and pin, by method.

    python scripts/host_allocation_costs.py [--tensors 8] [--gib 2] [--out FILE]  (a CUDA GPU)

An ``OffloadedCache`` holds each layer's keys and values in host memory pinned in place
(``cudaHostRegister``), so that kernels read them over PCIe. A first prompt pays for that memory:
``--tensors`` tensors of ``--gib`` GiB each (the default, 16 GiB, is 4 layers of a
Llama-3.1-8B-shaped model at 1M tokens in bf16). Each method is timed on fresh memory:

- ``zeros_then_register``: ``torch.zeros`` (the pages touched and zeroed by the CPU), then pinned;
- ``empty_then_register``: ``torch.empty`` then pinned (pinning maps any page not yet touched);
- ``mapping_then_register``: an anonymous mapping, zero by definition, wrapped as a tensor, pinned;
- ``*_threads``: the same with one thread per tensor;
- ``device_work_alone`` / ``device_work_beside_pinning``: a fixed sequence of small GPU launches
  and its synchronisation timed on the main thread alone and while a second thread pins: whether
  pinning can overlap a prompt's device work.
"""

import argparse
import mmap
import threading
import time

import torch

from ihip_compile.bench import print_and_save, start_gpu_script


def _register(t: torch.Tensor) -> None:
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0))
    if err != 0:
        raise RuntimeError(f"cudaHostRegister failed (cudaError {err})")


def _unregister(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def _zeros(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes // 2, dtype=torch.bfloat16)


def _empty(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes // 2, dtype=torch.bfloat16)


def _mapping(nbytes: int) -> torch.Tensor:
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.bfloat16)


def _each(tensors, work, threaded: bool) -> None:
    if not threaded:
        for t in tensors:
            work(t)
        return
    threads = [threading.Thread(target=work, args=(t,)) for t in tensors]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def time_method(make, count: int, nbytes: int, threaded: bool) -> dict:
    t0 = time.perf_counter()
    tensors = [make(nbytes) for _ in range(count)]
    t1 = time.perf_counter()
    _each(tensors, _register, threaded)
    t2 = time.perf_counter()
    row = {"allocate_s": t1 - t0, "register_s": t2 - t1, "total_s": t2 - t0,
           "first_bytes_zero": all(int(t[:4096].count_nonzero()) == 0 for t in tensors)}
    _each(tensors, _unregister, False)
    return row


def device_work() -> float:
    """Seconds for 2000 small launches and their synchronisation."""
    x = torch.randn(256, 256, device="cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(2000):
        x = torch.tanh(x @ x)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def device_work_beside_pinning(count: int, nbytes: int) -> dict:
    tensors = [_mapping(nbytes) for _ in range(count)]
    pinning = threading.Thread(target=_each, args=(tensors, _register, False))
    t0 = time.perf_counter()
    pinning.start()
    work_s = device_work()
    pinning.join()
    row = {"device_work_s": work_s, "pinning_s": time.perf_counter() - t0}
    _each(tensors, _unregister, False)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--gib", type=float, default=2.0)
    args, _ = start_gpu_script(parser)
    nbytes = int(args.gib * 2**30) // 4096 * 4096
    device_work()  # warm-up: the launches' first-call costs
    result = {"tensors": args.tensors, "bytes_each": nbytes, "torch": torch.__version__,
              "device_work_alone_s": device_work()}
    for name, make in (("zeros", _zeros), ("empty", _empty), ("mapping", _mapping)):
        for threaded in (False, True):
            key = f"{name}_then_register" + ("_threads" if threaded else "")
            result[key] = time_method(make, args.tensors, nbytes, threaded)
    result["device_work_beside_pinning"] = device_work_beside_pinning(args.tensors, nbytes)
    result["device_work_alone_after_s"] = device_work()
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
