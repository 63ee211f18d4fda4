"""The web gateway: JSON over HTTP, Server-Sent Events and the dashboard, over the services'
public gRPC API (``mediatag serve web``)."""
