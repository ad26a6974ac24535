//! The route matcher's cost per datagram per entry (issue 17: at most 0.2 µs with ten
//! prefixes). Run with `cargo bench -p relay-runtime --bench route`.
//!
//! Each iteration matches one datagram's parsed header against one route of ten prefixes
//! (eight included, two excluded), over a mix of agents that fall in the first, the last,
//! an excluded and no prefix, IPv4 and IPv6; and, separately, the header parse that a
//! caller does once per datagram whatever the number of routes.

use criterion::{Criterion, criterion_group, criterion_main};
use proto::sflow::{Header, parse_header};
use relay_runtime::route::{Route, RouteConfig};
use std::hint::black_box;

fn ten_prefixes() -> Route {
    let agents = [
        "10.1.0.0/24",
        "10.2.0.0/16",
        "10.3.4.0/22",
        "172.16.0.0/12",
        "192.168.10.0/24",
        "2001:db8:10::/48",
        "2001:db8:20::/48",
        "198.51.100.0/24",
        "!10.1.0.99",
        "!10.2.255.0/24",
    ];
    Route::try_from(&RouteConfig {
        agents: agents.iter().map(ToString::to_string).collect(),
        ..RouteConfig::default()
    })
    .expect("route")
}

fn bench(c: &mut Criterion) {
    let route = ten_prefixes();
    let datagrams: Vec<Vec<u8>> = [
        "10.1.0.7",
        "198.51.100.9",
        "10.1.0.99",
        "10.2.255.1",
        "203.0.113.5",
        "2001:db8:20::1",
        "2001:db8:99::1",
        "172.31.1.1",
    ]
    .iter()
    .map(|a| Header::from_agent(a.parse().unwrap()).to_bytes())
    .collect();
    let headers: Vec<_> = datagrams.iter().map(|d| parse_header(d)).collect();
    let mut group = c.benchmark_group("route");
    group.throughput(criterion::Throughput::Elements(headers.len() as u64));
    group.bench_function("match_ten_prefixes", |b| {
        b.iter(|| {
            let mut carried = 0;
            for header in &headers {
                carried += usize::from(route.matches(black_box(header.as_ref()), None));
            }
            carried
        })
    });
    group.bench_function("parse_header", |b| {
        b.iter(|| {
            let mut agents = 0u32;
            for d in &datagrams {
                agents += u32::from(parse_header(black_box(d)).is_ok());
            }
            agents
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
