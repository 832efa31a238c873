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

/* IPv4 source rules, DIR-24-8 (xdpfw_abi.h: XDPFW_V4_*): one entry per /24; 256-entry groups
 * for /24s that hold more than one prefix longer than /24; verdicts by id. Groups and ids
 * come in two halves of MAX_TBL8 and max_rules: each start builds the layout in the half
 * the running one does not use, then switches (xdpfw/dataplane/v4table.py). Memory-mapped
 * by the control plane, which writes them with aligned stores: a million words cost
 * milliseconds, not a syscall's ~200 ns each. */
BPF_TABLE_PINNED("array", __u32, __u64, v4_tbl24, XDPFW_V4_TBL24, PIN("v4_tbl24"),
		 BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, struct v4_group, v4_tbl8, 2 * MAX_TBL8, PIN("v4_tbl8"),
		 BPF_F_MMAPABLE);
BPF_TABLE_PINNED("array", __u32, __u64, v4_verdicts, MAX_V4_VERDICTS, PIN("v4_verdicts"),
		 BPF_F_MMAPABLE);

/* IPv6 source rules, longest prefix wins; /128s in a hash tried first (the longest match
 * there can be), skipped when the source's /64 bucket holds none (hostless_v6). */
BPF_TABLE_PINNED("lpm_trie", struct lpm_v6_key, struct prefix_verdict, rules_v6, MAX_RULES,
		 PIN("rules_v6"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct host_v6_key, struct prefix_verdict, hosts_v6, MAX_RULES,
		 PIN("hosts_v6"), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("array", __u32, __u64, hostless_v6, XDPFW_HOSTLESS_V6_WORDS,
		 PIN("hostless_v6"));

/* Proto/port refinements of a prefix; only looked up when its port_set is not 0. Three times
 * what adds may fill (MAX_PORT_RULES): a start builds its port sets beside the running ones
 * (port set ids come in two halves, like the IPv4 layout), and a delete, which can split
 * inherited entries, must find room (xdpfw/service.py: Firewall._check_port_room). */
BPF_TABLE_PINNED("hash", struct port_key, struct port_verdict, port_rules, 3 * MAX_PORT_RULES,
		 PIN("port_rules"));

/* Per-interface policy, indexed by the instance's interface slot (not the ifindex, which
 * repeats across network namespaces). */
BPF_TABLE_PINNED("array", __u32, struct iface_policy, iface_policy, MAX_IFACES,
		 PIN("iface_policy"));

/* Per interface slot: a program that runs after xdpfw's pass verdicts (a tail call), so
 * another XDP program keeps working on a guarded interface (README "Other XDP programs"). */
BPF_TABLE_PINNED("prog", __u32, __u32, chain_progs, MAX_IFACES, PIN("chain_progs"));

/* Packets/bytes per rule (indexed by rule slot), per reason, and passed/dropped per interface. */
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, rule_counters, MAX_RULES,
		 PIN("rule_counters"));
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, reason_counters, XDPFW_REASON_MAX,
		 PIN("reason_counters"));
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, iface_counters,
		 MAX_IFACES * XDPFW_IFACE_COUNTERS,
		 PIN("iface_counters"));

/* ---- Load balancer (lb.h). Capacities: MAX_SERVICES, MAX_BACKENDS, LB_TABLE_SIZE, LB_CT_SIZE,
 * MAX_CPUS (-D flags from ProgramConfig). ---- */

/* BCC's BPF_DEVMAP/BPF_CPUMAP cannot be pinned; this is the same map with a pin path. */
#define BPF_REDIRECT_MAP_PINNED(_type, _name, _max_entries, _pin) \
	BPF_XDP_REDIRECT_MAP(_type ":" _pin, int, _name, _max_entries)

/* One entry: how many services exist (0: the LB costs one array lookup) and the global CPU
 * steering of passing traffic. */
BPF_TABLE_PINNED("array", __u32, struct lb_config, lb_config, 1, PIN("lb_config"));

/* Virtual services by VIP, port and protocol: every one (the lookup of VIPs that share an
 * lb_vip_index bucket). */
BPF_TABLE_PINNED("hash", struct lb_vip, struct lb_service, lb_services, MAX_SERVICES,
		 PIN("lb_services"));

/* The fast way to the same: VIP bucket -> service slot + 1 (xdpfw_abi.h), then the slot. */
BPF_TABLE_PINNED("array", __u32, __u32, lb_vip_index, XDPFW_LB_VIP_INDEX,
		 PIN("lb_vip_index"));
BPF_TABLE_PINNED("array", __u32, struct lb_service_slot, lb_service_slots, MAX_SERVICES,
		 PIN("lb_service_slots"));

/* Maglev lookup tables, one row of LB_TABLE_SIZE (a prime) per service slot: backend slots. */
BPF_TABLE_PINNED("array", __u32, __u32, lb_tables, MAX_SERVICES * LB_TABLE_SIZE,
		 PIN("lb_tables"));

/* Backends by slot: the MACs to write and the egress port. */
BPF_TABLE_PINNED("array", __u32, struct lb_backend, lb_backends, MAX_BACKENDS,
		 PIN("lb_backends"));

/* Connection tracking: flow -> backend, so a flow keeps its backend when tables change. */
BPF_TABLE_PINNED("lru_hash", struct lb_flow, struct lb_ct, lb_conntrack, LB_CT_SIZE,
		 PIN("lb_conntrack"));

/* Per CPU, a direct-mapped cache of conntrack entries (struct lb_flow_slot). */
BPF_TABLE_PINNED("percpu_array", __u32, struct lb_flow_slot, lb_flow_cache,
		 XDPFW_LB_FLOW_CACHE, PIN("lb_flow_cache"));

/* Egress interfaces of redirect-mode backends: port slot -> ifindex. */
BPF_REDIRECT_MAP_PINNED("devmap", tx_ports, MAX_IFACES, PIN("tx_ports"));

/* One entry per CPU (value: queue size) for cpu_steer. */
BPF_REDIRECT_MAP_PINNED("cpumap", cpu_map, MAX_CPUS, PIN("cpu_map"));

/* Packets/bytes per service (forwarded, no backend) and per backend slot. */
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, lb_service_counters,
		 MAX_SERVICES * XDPFW_LB_SVC_COUNTERS, PIN("lb_service_counters"));
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, lb_backend_counters, MAX_BACKENDS,
		 PIN("lb_backend_counters"));

/* Per CPU: drops left before the next sampled one (fw_cfg.sample_rate restarts it). */
BPF_PERCPU_ARRAY(sample_countdown, __u32, 1);

/* One entry, written by the control plane: the drop-event sample rate and the maps to skip. */
BPF_TABLE_PINNED("array", __u32, struct fw_cfg, fw_config, 1, PIN("fw_config"));

/* Which store claimed these pins (never read by the program). */
BPF_TABLE_PINNED("array", __u32, struct pin_identity, pin_identity, 1, PIN("pin_identity"));

/* ---- Sampled drop events ---- */

/* Sampled drops for `xdpfw watch`. Not pinned: each build has its own, and the reader in the
 * daemon follows the program that is attached (xdpfw/events.py). 64 pages: ~4,900 events. */
BPF_RINGBUF_OUTPUT(drop_events, 64);

/* ---- Packet capture (xdpfw_abi.h: XDPFW_CAPTURE_*; control plane xdpfw/capture.py) ---- */

/* One entry: which verdicts a running capture takes, its snaplen and rate limit. Read only
 * while fw_cfg.capture is set. */
BPF_TABLE_PINNED("array", __u32, struct capture_cfg, capture_config, 1, PIN("capture_config"));

/* Captured, rate-limited and lost (ring full) packets, per CPU. */
BPF_TABLE_PINNED("percpu_array", __u32, struct counter, capture_counters,
		 XDPFW_CAPTURE_COUNTERS, PIN("capture_counters"));

/* Per CPU: the rate limit's state, and the record a frame is copied into before it goes to
 * the ring (bpf_ringbuf_output copies only the bytes used; a reserve must be of fixed size). */
BPF_PERCPU_ARRAY(capture_bucket, struct capture_bucket, 1);
BPF_PERCPU_ARRAY(capture_scratch, struct capture_record, 1);

/* Captured frames. Not pinned: each build has its own, read by the daemon across upgrades
 * like drop_events. 512 pages (2 MiB): ~1,000 full-size frames, many more short ones. */
BPF_RINGBUF_OUTPUT(capture_ring, 512);

#endif /* XDPFW_MAPS_H */
