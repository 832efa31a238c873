"""L4 load balancer control plane: Maglev tables, backend health checks, next-hop resolution,
proxy services (service.py says which module holds what).

No BCC: the Dataplane owns the maps these values are written into, and the proxy's programs.
"""
