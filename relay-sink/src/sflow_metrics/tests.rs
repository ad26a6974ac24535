use std::net::IpAddr;

use proto::sflow::Header;
use proto::sflow::counters::{EthernetCounters, IfCounters, counter_datagram};

use super::*;

const AGENT: &str = "10.0.0.1";

fn metrics(max_series: usize) -> SflowMetrics {
    SflowMetrics::new(
        &prometheus::Registry::new(),
        Duration::from_secs(300),
        max_series,
    )
}

/// Generic counters of interface `if_index` with `in_octets` and `in_errors`; the rest
/// fixed, speed 10 Gbit/s, up.
fn generic(if_index: u32, in_octets: u64, in_errors: u32) -> IfCounters {
    IfCounters {
        if_index,
        if_type: 6,
        if_speed: Some(10_000_000_000),
        if_direction: 1,
        if_status: 3,
        in_octets: Some(in_octets),
        in_ucast_pkts: Some(100),
        in_multicast_pkts: Some(10),
        in_broadcast_pkts: Some(1),
        in_discards: Some(0),
        in_errors: Some(in_errors),
        in_unknown_protos: None,
        out_octets: Some(5),
        out_ucast_pkts: Some(7),
        out_multicast_pkts: None,
        out_broadcast_pkts: None,
        out_discards: None,
        out_errors: Some(0),
        promiscuous_mode: 0,
    }
}

/// A datagram of agent [`AGENT`] (uptime `uptime_ms`) with one counter sample.
fn datagram(uptime_ms: u32, sequence: u32, counters: &IfCounters) -> pb::Datagram {
    let mut header = Header::from_agent(AGENT.parse().unwrap());
    header.uptime_ms = uptime_ms;
    header.sequence = sequence;
    pb::Datagram {
        payload: counter_datagram(&header, &[(sequence, counters, None)]).into(),
        ..Default::default()
    }
}

/// The value of `name` for interface `if_index` of [`AGENT`] at site `site-a`.
fn value(text: &str, name: &str, if_index: u32) -> Option<String> {
    let prefix = format!("{name}{{agent=\"{AGENT}\",ifindex=\"{if_index}\",site=\"site-a\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map(ToString::to_string)
}

fn site() -> Arc<str> {
    "site-a".into()
}

#[test]
fn counters_add_up_across_a_32_bit_wrap() {
    let m = metrics(DEFAULT_MAX_SERIES);
    m.observe(
        &site(),
        &[datagram(1_000, 1, &generic(3, 1_000, u32::MAX - 5))],
    );
    m.observe(&site(), &[datagram(21_000, 2, &generic(3, 3_000, 4))]);
    let text = m.render();
    assert_eq!(
        value(&text, "sflow_if_in_errors_total", 3).as_deref(),
        Some((u64::from(u32::MAX) - 5 + 10).to_string().as_str()),
        "{text}"
    );
    assert_eq!(
        value(&text, "sflow_if_in_octets_total", 3).as_deref(),
        Some("3000")
    );
    assert_eq!(
        value(&text, "sflow_if_in_packets_total", 3).as_deref(),
        Some("111")
    );
    assert_eq!(
        value(&text, "sflow_if_speed_bps", 3).as_deref(),
        Some("10000000000")
    );
    assert_eq!(value(&text, "sflow_if_oper_up", 3).as_deref(), Some("1"));
}

#[test]
fn an_agent_restart_is_a_reset_prometheus_sees() {
    let m = metrics(DEFAULT_MAX_SERIES);
    m.observe(
        &site(),
        &[datagram(500_000, 40, &generic(3, 9_000_000, 50))],
    );
    m.observe(
        &site(),
        &[datagram(520_000, 41, &generic(3, 9_500_000, 60))],
    );
    // Restarted: uptime back near zero, the sample sequence back to 1.
    m.observe(&site(), &[datagram(2_000, 1, &generic(3, 1_000, 1))]);
    let text = m.render();
    assert_eq!(
        value(&text, "sflow_if_in_octets_total", 3).as_deref(),
        Some("1000")
    );
    assert_eq!(
        value(&text, "sflow_if_in_errors_total", 3).as_deref(),
        Some("1")
    );
    // And counting goes on from there.
    m.observe(&site(), &[datagram(22_000, 2, &generic(3, 4_000, 3))]);
    let text = m.render();
    assert_eq!(
        value(&text, "sflow_if_in_octets_total", 3).as_deref(),
        Some("4000")
    );
}

#[test]
fn a_counter_that_goes_backwards_is_a_restart_too() {
    let m = metrics(DEFAULT_MAX_SERIES);
    m.observe(&site(), &[datagram(5_000, 7, &generic(3, 9_000, 50))]);
    // An agent that restarted within seconds: its uptime barely went back, its sequence
    // went on, but its octet counter went back.
    m.observe(&site(), &[datagram(6_000, 8, &generic(3, 200, 0))]);
    let text = m.render();
    assert_eq!(
        value(&text, "sflow_if_in_octets_total", 3).as_deref(),
        Some("200")
    );
}

#[test]
fn duplicated_and_reordered_samples_count_once() {
    let m = metrics(DEFAULT_MAX_SERIES);
    let first = datagram(1_000, 1, &generic(3, 1_000, 0));
    let second = datagram(21_000, 2, &generic(3, 2_000, 0));
    let third = datagram(41_000, 3, &generic(3, 3_000, 0));
    m.observe(
        &site(),
        &[first, third.clone(), second.clone(), second, third],
    );
    let text = m.render();
    assert_eq!(
        value(&text, "sflow_if_in_octets_total", 3).as_deref(),
        Some("3000")
    );
}

#[test]
fn unknown_values_are_never_exported() {
    let m = metrics(DEFAULT_MAX_SERIES);
    let mut counters = generic(3, 1_000, 0);
    counters.in_errors = None;
    counters.if_speed = None;
    m.observe(&site(), &[datagram(1_000, 1, &counters)]);
    let text = m.render();
    assert_eq!(value(&text, "sflow_if_in_errors_total", 3), None, "{text}");
    assert_eq!(value(&text, "sflow_if_speed_bps", 3), None);
    assert!(!text.contains("4294967295") && !text.contains("18446744073709551615"));
    // Known later: a total from then on.
    m.observe(&site(), &[datagram(21_000, 2, &generic(3, 2_000, 7))]);
    assert_eq!(
        value(&m.render(), "sflow_if_in_errors_total", 3).as_deref(),
        Some("7")
    );
}

#[test]
fn ethernet_counters_and_the_source_index_without_a_generic_record() {
    let m = metrics(DEFAULT_MAX_SERIES);
    let mut header = Header::from_agent(AGENT.parse().unwrap());
    header.uptime_ms = 1;
    let mut ethernet = EthernetCounters::from_array([Some(0); 13]);
    ethernet.fcs_errors = Some(12);
    let payload = counter_datagram(&header, &[(1, &generic(4, 1, 0), Some(&ethernet))]);
    m.observe(
        &site(),
        &[pb::Datagram {
            payload: payload.into(),
            ..Default::default()
        }],
    );
    let text = m.render();
    assert_eq!(
        value(&text, "sflow_if_fcs_errors_total", 4).as_deref(),
        Some("12")
    );
}

#[test]
fn the_series_limit_refuses_new_interfaces_and_counts_them() {
    let one = {
        let m = metrics(DEFAULT_MAX_SERIES);
        m.observe(&site(), &[datagram(1, 1, &generic(1, 1, 0))]);
        m.lock().series
    };
    let m = metrics(2 * one);
    for if_index in 1..=3 {
        m.observe(&site(), &[datagram(1, 1, &generic(if_index, 1, 0))]);
    }
    let text = m.render();
    assert!(value(&text, "sflow_if_in_octets_total", 2).is_some());
    assert_eq!(value(&text, "sflow_if_in_octets_total", 3), None);
    assert_eq!(m.series_dropped.get(), one as u64);
    assert_eq!(m.series_gauge.get(), 2 * one as i64);
    // Known interfaces still count.
    m.observe(&site(), &[datagram(20_001, 2, &generic(1, 11, 0))]);
    assert_eq!(
        value(&m.render(), "sflow_if_in_octets_total", 1).as_deref(),
        Some("11")
    );
}

#[test]
fn silent_interfaces_expire() {
    let m = SflowMetrics::new(&prometheus::Registry::new(), Duration::ZERO, 100);
    m.observe(&site(), &[datagram(1, 1, &generic(1, 1, 0))]);
    let text = m.render();
    assert_eq!(value(&text, "sflow_if_in_octets_total", 1), None, "{text}");
    assert_eq!(m.lock().series, 0);
}

#[test]
fn sites_and_agents_are_labels_and_sites_are_escaped() {
    let m = metrics(DEFAULT_MAX_SERIES);
    let odd: Arc<str> = "site \"b\"\\".into();
    m.observe(&odd, &[datagram(1, 1, &generic(1, 1, 0))]);
    let text = m.render();
    assert!(
        text.contains(
            r#"sflow_if_in_octets_total{agent="10.0.0.1",ifindex="1",site="site \"b\"\\"} 1"#
        ),
        "{text}"
    );
    let v6: IpAddr = "2001:db8::1".parse().unwrap();
    let mut header = Header::from_agent(v6);
    header.uptime_ms = 1;
    let payload = counter_datagram(&header, &[(1, &generic(9, 5, 0), None)]);
    m.observe(
        &site(),
        &[pb::Datagram {
            payload: payload.into(),
            ..Default::default()
        }],
    );
    assert!(
        m.render().contains(
            r#"sflow_if_in_octets_total{agent="2001:db8::1",ifindex="9",site="site-a"} 5"#
        )
    );
}

#[test]
fn raw_counters_are_listed_in_declaration_order() {
    for (i, raw) in Raw::ALL.iter().enumerate() {
        assert_eq!(*raw as usize, i);
    }
}
