"""xdpfw: an XDP firewall and load-balancer appliance."""
