"""Ends a python-backend model process (stub) once its tritonserver is gone (copied into each model directory).

A stub whose tritonserver died can outlive it for good, holding its memory (hundreds of MB) with parent 1:
the stub's own check, kill(parent, 0), succeeds while the dead tritonserver is an unreaped zombie, and once
it fails, the stub's exit path waits for the GIL, which its main thread keeps while it waits on shared memory
for an answer to a request in flight that no tritonserver will ever give (seen with gdb on such a stub). So
no Python thread in the stub can end it either. The watch is a small shell process beside the stub instead:
every CHECK_INTERVAL_S it compares the stub's parent with the tritonserver it started under (the kernel
reparents a process the moment its parent exits, before any reaping) and SIGKILLs the stub when they
differ; it exits by itself once the stub is gone. PR_SET_PDEATHSIG in the stub is no help: it fires when
the *thread* that forked the stub ends, and tritonserver forks stubs from backend threads, not always its
main one, which may end long before the server does.
"""

import os
import subprocess

CHECK_INTERVAL_S = 0.5

# $1 stub pid, $2 its tritonserver's pid, $3 seconds between checks. Field 2 after the command name in
# /proc/PID/stat is the parent pid. The watch checks its own parent first: once that is not the stub, the
# stub is gone and its pid may belong to another process.
WATCH = r"""
stub=$1 server=$2 interval=$3
while :; do
    read -r own < /proc/$$/stat; set -- ${own##*) }
    [ "$2" = "$stub" ] || exit 0
    read -r stat < /proc/$stub/stat; set -- ${stat##*) }
    [ "$2" = "$server" ] || break
    sleep "$interval"
done
kill -9 "$stub"
"""

_started = []


def exit_with_parent(interval_s=CHECK_INTERVAL_S):
    """Start the watch that SIGKILLs this process once its parent (tritonserver) has exited. One per process."""
    if _started:
        return
    _started.append(subprocess.Popen(
        ["/bin/sh", "-c", WATCH, "embedline-parent-watch", str(os.getpid()), str(os.getppid()), str(interval_s)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
