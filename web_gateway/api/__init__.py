"""The HTTP surface: requests and JSON <-> protobuf, errors as ``google.rpc.Status`` JSON."""
