"""A fleet of appliances sharing their rules through etcd (README, "Fleet").

- etcd.py: the etcd v3 client (JSON gateway, httpx);
- layout.py: the keys, and the check of a value before it is applied;
- writer.py: REST writes as guarded transactions;
- sync.py: the per-node agent that applies etcd's changes through the Firewall;
- status.py: node status under a lease, and the fleet view;
- cache.py: the revision a node's store holds;
- service.py: `Fleet`, what the daemon and the API hold.
"""
