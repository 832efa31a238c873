/* maps.h: every map of the XDP firewall, in one place.
 *
 * All maps are pinned under PIN_DIR (a -D flag from the loader), so a restarted control plane
 * reuses them and the attached program keeps filtering while it restarts. Capacities are -D flags
 * too (xdpfw/dataplane/loader.py: ProgramConfig).
 */
#ifndef XDPFW_MAPS_H
#define XDPFW_MAPS_H

#include "xdpfw_abi.h"

#define PIN(name) PIN_DIR "/" name

/* Source-prefix rules, longest prefix wins. */
BPF_TABLE_PINNED("lpm_trie", struct lpm_v4_key, struct prefix_verdict, rules_v4, MAX_RULES,
		 PIN("rules_v4"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lpm_v6_key, struct prefix_verdict, rules_v6, MAX_RULES,
		 PIN("rules_v6"), BPF_F_NO_PREALLOC);

/* Proto/port refinements of a prefix; only looked up when its port_set is not 0. */
BPF_TABLE_PINNED("hash", struct port_key, struct port_verdict, port_rules, MAX_PORT_RULES,
		 PIN("port_rules"));

/* Per-interface policy, keyed by ingress ifindex. */
BPF_TABLE_PINNED("hash", __u32, struct iface_cfg, iface_config, MAX_IFACES, PIN("iface_config"));

/* Packets/bytes per rule (indexed by rule slot), per reason, and passed/dropped per interface. */
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, rule_counters, MAX_RULES,
		 PIN("rule_counters"));
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, reason_counters, XDPFW_REASON_MAX,
		 PIN("reason_counters"));
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, iface_counters,
		 MAX_IFACES * XDPFW_IFACE_COUNTERS,
		 PIN("iface_counters"));

#endif /* XDPFW_MAPS_H */
