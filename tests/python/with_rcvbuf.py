#!/usr/bin/env python3
"""Runs a Python script with SO_RCVBUF set to BYTES on every UDP socket it binds.

The benchmark uses it to give the unmodified sflow_fwd.py port the same socket receive
buffer as sflow-relay gets from --recv-buffer, without changing the script itself.

  with_rcvbuf.py BYTES SCRIPT [ARGS...]
"""
import runpy
import socket
import sys

size = int(sys.argv[1])
script = sys.argv[2]
sys.argv = [script] + sys.argv[3:]

_bind = socket.socket.bind


def bind(self, address):
    if self.type == socket.SOCK_DGRAM:
        self.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    return _bind(self, address)


socket.socket.bind = bind
runpy.run_path(script, run_name="__main__")
