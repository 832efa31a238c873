"""Service forwarding mode `proxy`: TCP splicing in the kernel (sockhash + sk_skb programs),
with a user-space relay as fallback. See engine.ProxyEngine."""
