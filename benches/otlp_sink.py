#!/usr/bin/env python3
"""An OTLP/gRPC trace receiver that counts what it gets, for measuring tracing's cost
(benches/RESULTS.md, "Seeing every call"): the proxy exports to a real collector's
protocol, and the receiver's own CPU is not the proxy's.

    pip install grpcio opentelemetry-proto
    benches/otlp_sink.py 127.0.0.1:4317     # prints the spans received every 5 s
"""
import sys
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

spans = 0
lock = threading.Lock()


class Sink(trace_service_pb2_grpc.TraceServiceServicer):
    def Export(self, request, context):
        global spans
        n = sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
        with lock:
            spans += n
        return trace_service_pb2.ExportTraceServiceResponse()


def main():
    addr = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:4317"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    server.add_insecure_port(addr)
    server.start()
    print(f"otlp sink on {addr}", flush=True)
    while True:
        time.sleep(5)
        with lock:
            print(f"spans={spans}", flush=True)


if __name__ == "__main__":
    main()
