"""A real gRPC server and client for the integration tests (grpcio, no
generated code: the method takes and returns raw bytes).

  echo.py serve             serve /meshpatterns.test.Echo/Call on 127.0.0.1:<port 0>;
                            print "port <n>", then "served <n>" after every call;
                            stop when stdin closes
  echo.py call ADDR N       make N unary calls through ADDR (HTTP/2 cleartext,
                            content-type application/grpc); print one JSON line
                            per call: {"code", "details", "metadata"} where
                            metadata joins the initial and trailing metadata
"""

import json
import sys
import threading
from concurrent import futures

import grpc

METHOD = "/meshpatterns.test.Echo/Call"


def serve():
    lock = threading.Lock()
    served = [0]

    def call(request, context):
        with lock:
            served[0] += 1
            print(f"served {served[0]}", flush=True)
        return request

    handler = grpc.method_handlers_generic_handler(
        "meshpatterns.test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(call)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    sys.stdin.read()
    server.stop(0)


def call(addr, n):
    with grpc.insecure_channel(addr) as channel:
        stub = channel.unary_unary(METHOD)
        for i in range(n):
            try:
                _, c = stub.with_call(f"hello {i}".encode(), timeout=20)
                out = {"code": c.code().name, "details": c.details() or "", "metadata": {}}
                md = list(c.initial_metadata() or []) + list(c.trailing_metadata() or [])
            except grpc.RpcError as e:
                out = {"code": e.code().name, "details": e.details() or ""}
                md = list(e.initial_metadata() or []) + list(e.trailing_metadata() or [])
            out["metadata"] = {k: v if isinstance(v, str) else v.decode("latin-1") for k, v in md}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    elif sys.argv[1:2] == ["call"] and len(sys.argv) == 4:
        call(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(__doc__)
