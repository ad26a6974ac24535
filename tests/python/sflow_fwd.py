#!/usr/bin/env python3
"""Python 3 port of sflow_fwd.py, the script of "Secure forwarding of sFlow using ssh"
(blog.sflow.com, May 2019), kept faithful to the original: the same flags and defaults,
recv(2048) on the collector side (longer datagrams are cut, as in the original), one
lowercase hex line per datagram flushed at once, and bytearray.fromhex(line[:-1]) on the
server side. Used only as the interoperability peer in sflow-relay's tests and benchmark.

  ./sflow_fwd.py | ssh user@analyzer './sflow_fwd.py -s 127.0.0.1'
"""
import argparse
import socket
import sys

parser = argparse.ArgumentParser(description='Serialize/deserialize sFlow')
parser.add_argument('-c', '--collector', default='')
parser.add_argument('-s', '--server')
parser.add_argument('-p', '--port', type=int, default=6343)
args = parser.parse_args()

sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

if args.server is not None:
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        buf = bytearray.fromhex(line[:-1])
        sock.sendto(buf, (args.server, args.port))
else:
    sock.bind((args.collector, args.port))
    while True:
        buf = sock.recv(2048)
        if not buf:
            break
        print(buf.hex(), flush=True)
