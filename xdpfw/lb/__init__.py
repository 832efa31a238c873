"""L4 load balancer control plane: Maglev tables, backend health checks, next-hop resolution.

Pure Python, no BCC: the data plane owns the maps these values are written into.
"""
