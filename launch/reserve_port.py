"""Prints a free TCP port for a JAX coordinator, then keeps every other program from taking it for as
long as the process that started this one runs:

    read -r port < <(python3 launch/reserve_port.py)

A port merely found free and let go can be taken by another job before process 0 binds it, and two
coordinators on one port do not fail: gRPC binds with SO_REUSEPORT, so both bind it and the kernel
shares the connecting processes out between them. Here the port stays bound, not listening, with
SO_REUSEPORT: process 0's coordinator can still bind it, while the kernel gives it to no one asking
for a free port and refuses it to anyone binding it without that option.
"""

import os
import socket
import time


def reserve() -> socket.socket:
    """A socket holding a port the kernel chose, on every address, as gRPC's coordinator binds."""
    try:
        holder = socket.socket(socket.AF_INET6)
        holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # IPv4 addresses too
        address = ("::", 0)
    except OSError:  # a machine without IPv6
        holder = socket.socket(socket.AF_INET)
        address = ("0.0.0.0", 0)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(address)
    return holder


if __name__ == "__main__":
    holder = reserve()
    print(holder.getsockname()[1], flush=True)
    # Hold none of the caller's pipes: a caller reading its job's output to the end would wait for this.
    nowhere = os.open(os.devnull, os.O_RDWR)
    for descriptor in (0, 1, 2):
        os.dup2(nowhere, descriptor)
    parent = os.getppid()
    # Until the parent exits: its children pass to another parent then, even before it is reaped.
    while os.getppid() == parent:
        time.sleep(1)
