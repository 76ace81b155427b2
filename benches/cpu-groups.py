#!/usr/bin/env python3
"""Where a whole machine's CPU goes per operation, in groups.

Record every CPU while a benchmark runs, then group each sample by its leaf symbol (user
space) or by its kernel call chain, and divide by the operations done during the recording:

    perf record -a -g -F 999 -o cpu.perf -- sleep 10        # while `dynkv bench` runs
    perf script -i cpu.perf -F comm,tid,ip,sym,dso > cpu.txt
    benches/cpu-groups.py cpu.txt OPS_PER_SEC SECONDS [FREQUENCY] [--list GROUP]

OPS_PER_SEC is the benchmark's throughput during the recording, SECONDS the recording's
length, FREQUENCY perf's sampling rate (999 unless given). `--list GROUP` also prints the
leaf symbols of one group. The groups separate what belongs to the parts dynkv is built from
(the kernel's UDP and fsync work, tokio, quinn, fjall, ring) from dynkv's own work.
"""

import collections
import re
import sys

# Kernel samples: the first pattern that matches anywhere in the call chain names the group.
KERNEL_GROUPS = [
    ("kernel: fdatasync and block IO", r"fdatasync|do_fsync|ext4_sync|blk_|virtio_blk|iowrite"),
    ("kernel: UDP send and receive", r"udp|sendmsg|recvmsg|recvmmsg|net_rx|__dev_queue|ip_|skb|"
     r"sock_|loopback|__napi|netif"),
    ("kernel: wake-ups, scheduling, epoll, futex", r"futex|epoll|schedule|finish_task_switch|"
     r"try_to_wake_up|ep_poll|nanosleep|hrtimer|sched_yield"),
    ("kernel: page cache reads and writes", r"vfs_write|vfs_read|pread|pwrite|ext4_file|filemap|"
     r"copy_page|generic_perform_write"),
    ("kernel: faults and memory mapping", r"page_fault|exc_page|do_anonymous|mmap|munmap|madvise|"
     r"brk"),
]
# User-space samples: the first pattern that matches the leaf symbol names the group.
USER_GROUPS = [
    ("crypto (ring)", r"(?i)aes|gcm|ghash|chacha|poly1305|ring::|ring_core"),
    ("quinn", r"^quinn|^<quinn"),
    ("tokio", r"^tokio|^<tokio"),
    ("fjall (LSM, memtable, journal)", r"lsm_tree|fjall|crossbeam_skiplist|lz4|xxh"),
    ("allocation", r"^_?mi_|mimalloc|__rust_alloc|__rust_dealloc|^alloc::alloc"),
    ("copies and compares", r"memcpy|memmove|memset|memcmp"),
    ("MessagePack", r"rmp|serde"),
    ("BLAKE3", r"(?i)blake3"),
    ("dynkv's own functions", r"dynkv"),
    ("std, bytes, hashing, metrics, locks, tracing", r"tracing|metrics|hdrhistogram|parking_lot|"
     r"hashbrown|^core::|^<core::|^alloc::|^<alloc::|^std::|^<std::|bytes::"),
]


def read_samples(path):
    """Yields (command, [(symbol, dso), ...] leaf first) for each sample of `perf script`."""
    command, stack = None, []
    with open(path, errors="replace") as lines:
        for line in lines:
            if not line.strip():
                if command is not None:
                    yield command, stack
                command, stack = None, []
            elif line[0] not in " \t":
                command, stack = line.split()[0], []
            else:
                frame = re.match(r"\s*[0-9a-f]+ (.*) \((.*)\)$", line.rstrip())
                if frame:
                    stack.append((frame.group(1), frame.group(2)))
    if command is not None:
        yield command, stack


def group_of(command, stack):
    if not stack:
        return "unknown"
    leaf, dso = stack[0]
    # Only the kernel's own frames name a kernel group: user frames above the system call
    # (`quinn_udp::…`, say) would otherwise pull a futex wake into the UDP group.
    kernel = " ".join(symbol for symbol, frame_dso in stack if "kallsyms" in frame_dso)
    if command == "swapper" or re.search(r"cpuidle|default_idle|safe_halt", kernel):
        return "idle"
    if "kallsyms" in dso:
        for name, pattern in KERNEL_GROUPS:
            if re.search(pattern, kernel):
                return name
        return "kernel: other"
    for name, pattern in USER_GROUPS:
        if re.search(pattern, leaf):
            return name
    if "libc" in dso or "ld-linux" in dso or "vdso" in leaf:
        return "libc and vDSO (clock reads)"
    return "other user space"


def main():
    args = sys.argv[1:]
    listed = None
    if "--list" in args:
        at = args.index("--list")
        listed = args[at + 1]
        del args[at:at + 2]
    if len(args) not in (3, 4):
        sys.exit(__doc__)
    path, ops_per_sec, seconds = args[0], float(args[1]), float(args[2])
    frequency = float(args[3]) if len(args) == 4 else 999.0
    operations = ops_per_sec * seconds
    us_per_sample = 1e6 / frequency
    groups, leaves = collections.Counter(), collections.Counter()
    for command, stack in read_samples(path):
        group = group_of(command, stack)
        groups[group] += 1
        if group == listed:
            leaves[stack[0][0][:120]] += 1
    total = sum(groups.values())
    busy = total - groups["idle"]
    if busy == 0:
        sys.exit("no busy samples")
    print(f"{total} samples, {100 * busy / total:.1f}% busy")
    for name, count in groups.most_common():
        if name != "idle":
            print(f"{100 * count / busy:5.1f}%  {count * us_per_sample / operations:6.1f} µs/op  {name}")
    print(f"busy: {busy * us_per_sample / operations:.1f} µs/op")
    for symbol, count in leaves.most_common(25):
        print(f"    {count * us_per_sample / operations:5.2f}  {symbol}")


if __name__ == "__main__":
    main()
