"""CPU threads for torch, re-decided while a command runs (--threads); imported by the commands that run models."""
import os
import time

import torch

from errors import UserError


class Threads:
    """CPU threads for torch, re-decided while a command runs. --threads N > 0: always N. 0 (auto): the cores
    that other programs leave idle, split between this machine's processes of the run, at least 1 and at most
    torch's own setting. Why re-decide: torch's threads spin while they wait for each other, so 2 threads with
    another busy process on 2 cores made a training step of the built-in model 10x slower than 1 thread, and a
    load that starts after we did would otherwise stay oversubscribed. Other programs' load is the machine's
    busy CPU time (/proc/stat) minus this process's own (/proc/self/stat) since the last check."""

    def __init__(self, flag, world=1, every_s=5.0):
        if flag < 0:
            raise UserError(f"--threads must be >= 0 (0: auto), got {flag}")
        self.flag, self.world, self.every_s = flag, world, every_s
        self.max = torch.get_num_threads()
        self.last = self.sample()
        if flag > 0:
            torch.set_num_threads(flag)
        else:
            time.sleep(0.3)  # a first reading of the load before we add to it
            self.update(force=True)

    @staticmethod
    def sample():
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                ours = sum(int(v) for v in f.read().rsplit(")", 1)[1].split()[11:13])  # utime + stime
            return time.monotonic(), sum(values), values[3] + values[4], ours
        except (OSError, ValueError, IndexError):
            return None

    def limit(self, n):
        """At most n threads from now on (auto only: an explicit --threads N stays N)."""
        self.max = max(1, min(self.max, n))
        if self.flag <= 0 and torch.get_num_threads() > self.max:
            torch.set_num_threads(self.max)

    def update(self, force=False):
        """Re-check the load (at most every every_s seconds); returns the thread count now in use."""
        if self.flag > 0 or self.last is None:
            return torch.get_num_threads()
        now = self.sample()
        if now is None or (not force and now[0] - self.last[0] < self.every_s):
            return torch.get_num_threads()
        (_, total0, idle0, ours0), (_, total1, idle1, ours1) = self.last, now
        self.last = now
        cores = os.cpu_count() or 1
        ticks = max(1, total1 - total0)
        busy = cores * ((ticks - (idle1 - idle0)) - (ours1 - ours0)) / ticks  # others' busy cores
        threads = max(1, min(self.max, int((cores - round(max(0.0, busy))) // self.world)))
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads
