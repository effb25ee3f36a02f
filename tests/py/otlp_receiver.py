"""A minimal OTLP/gRPC receiver for the end-to-end tests (PyPI opentelemetry-proto + grpcio).

Implements TraceService/Export and MetricsService/Export, listens on 127.0.0.1:0, prints
its port (and writes it to --port-file), and appends what it receives to --out as JSON
lines: one line per span ({"signal": "span", ...}) and one per metric data point
({"signal": "metric", ...}), ids in lowercase hex. --delay makes every export answer
that many seconds late, to play a slow collector.

    python3 otlp_receiver.py --out received.jsonl --port-file port [--delay 5]
"""

import argparse
import json
import os
import sys
import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import (
    trace_service_pb2,
    trace_service_pb2_grpc,
)


def any_value(value):
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def attributes(key_values):
    return {kv.key: any_value(kv.value) for kv in key_values}


class Sink:
    def __init__(self, path, delay):
        self.path = path
        self.delay = delay
        self.lock = threading.Lock()

    def write(self, records):
        if self.delay:
            time.sleep(self.delay)
        with self.lock, open(self.path, "a", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, sort_keys=True) + "\n")


class Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):
        records = []
        for resource_spans in request.resource_spans:
            resource = attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    records.append(
                        {
                            "signal": "span",
                            "service": resource.get("service.name"),
                            "scope": scope_spans.scope.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": span.kind,
                            "start_ns": span.start_time_unix_nano,
                            "end_ns": span.end_time_unix_nano,
                            "attributes": attributes(span.attributes),
                            "status_code": span.status.code,
                        }
                    )
        self.sink.write(records)
        return trace_service_pb2.ExportTraceServiceResponse()


class Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):
        records = []
        for resource_metrics in request.resource_metrics:
            resource = attributes(resource_metrics.resource.attributes)
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    for point in getattr(metric, kind).data_points:
                        record = {
                            "signal": "metric",
                            "service": resource.get("service.name"),
                            "name": metric.name,
                            "unit": metric.unit,
                            "kind": kind,
                            "attributes": attributes(point.attributes),
                        }
                        if kind == "histogram":
                            record["count"] = point.count
                            record["sum"] = point.sum
                        else:
                            number = point.WhichOneof("value")
                            record["value"] = getattr(point, number) if number else None
                        records.append(record)
        self.sink.write(records)
        return metrics_service_pb2.ExportMetricsServiceResponse()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON lines file to append to")
    parser.add_argument("--port-file", help="write the bound port here")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds per export")
    args = parser.parse_args()

    sink = Sink(args.out, args.delay)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(sink), server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Metrics(sink), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(str(port))
        os.replace(tmp, args.port_file)
    try:
        server.wait_for_termination()
    except KeyboardInterrupt:
        server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
