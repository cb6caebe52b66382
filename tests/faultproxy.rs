//! The fault proxy itself: the real aws-sdk-ec2 client talks to moto through it, and every
//! injected fault must reach the SDK the way EC2 would send it, while the proxy records what
//! it did. Later provisioner tests rely on exactly these behaviours.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use aws_sdk_ec2::config::retry::RetryConfig;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::run_instances::RunInstancesError;
use aws_sdk_ec2::types::{InstanceMarketOptionsRequest, InstanceType, MarketType, ResourceType, Tag, TagSpecification};
use common::faultproxy::{busiest_window, Fault, FaultProxy, Rule};
use common::moto::Moto;

/// moto, a proxy in front of it, and what a launch needs.
struct World {
    moto: Moto,
    proxy: FaultProxy,
    ami: String,
    subnet: String,
}

fn world() -> World {
    let moto = Moto::start();
    let proxy = FaultProxy::start(&moto.endpoint());
    let ami = moto.ami();
    let subnet = moto.subnets().into_iter().next().expect("moto has a subnet");
    World { moto, proxy, ami, subnet }
}

impl World {
    /// A client that makes exactly one attempt per call, so each injected fault shows as is.
    fn one_shot(&self) -> aws_sdk_ec2::Client {
        self.proxy.client(RetryConfig::disabled())
    }

    /// Launches one tagged instance of `ty` through `client`; returns its id (the error boxed,
    /// as the SDK's is large).
    fn launch(
        &self,
        client: &aws_sdk_ec2::Client,
        ty: InstanceType,
        spot: bool,
    ) -> Result<String, Box<SdkError<RunInstancesError>>> {
        let tags = TagSpecification::builder()
            .resource_type(ResourceType::Instance)
            .tags(Tag::builder().key("paddock:cluster").value("proxy-test").build())
            .build();
        let mut call = client
            .run_instances()
            .image_id(&self.ami)
            .instance_type(ty)
            .subnet_id(&self.subnet)
            .min_count(1)
            .max_count(1)
            .tag_specifications(tags);
        if spot {
            call = call
                .instance_market_options(InstanceMarketOptionsRequest::builder().market_type(MarketType::Spot).build());
        }
        let out = self.moto.block_on(call.send()).map_err(Box::new)?;
        Ok(out
            .instances()
            .first()
            .and_then(|i| i.instance_id())
            .expect("RunInstances returns the instance")
            .to_string())
    }
}

/// The EC2 error code and HTTP status of a service error; panics on any other outcome.
#[track_caller]
fn code_and_status<T: std::fmt::Debug, E: ProvideErrorMetadata + std::fmt::Debug>(
    result: Result<T, Box<SdkError<E>>>,
) -> (String, u16) {
    let err = result.expect_err("the call should have failed");
    assert!(matches!(*err, SdkError::ServiceError(_)), "expected an EC2 error answer, got {err:?}");
    let status = err.raw_response().map(|r| r.status().as_u16()).unwrap_or_default();
    (err.code().unwrap_or_default().to_string(), status)
}

#[test]
fn throttle_answers_request_limit_exceeded_without_calling_moto() {
    let w = world();
    w.proxy.add(Rule::on("RunInstances").fault(Fault::Throttle).rate(1.0));

    let result = w.launch(&w.one_shot(), InstanceType::T3Small, false);

    assert_eq!(code_and_status(result), ("RequestLimitExceeded".to_string(), 503));
    assert!(w.moto.instances().is_empty(), "a throttled launch must not reach moto");
    let calls = w.proxy.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].action, "RunInstances");
    assert_eq!(calls[0].fault, Some(Fault::Throttle));
    assert!(!calls[0].forwarded);
    // The form body is decoded down to nested members, which is what rules match on.
    assert_eq!(calls[0].params.get("InstanceType").map(String::as_str), Some("t3.small"));
    assert_eq!(calls[0].params.get("TagSpecification.1.Tag.1.Key").map(String::as_str), Some("paddock:cluster"));
}

#[test]
fn capacity_rule_on_one_instance_type_fails_only_that_type() {
    let w = world();
    w.proxy.add(Rule::on("RunInstances").when("InstanceType", "t3.small").fault(Fault::Capacity));
    let client = w.one_shot();

    let small = w.launch(&client, InstanceType::T3Small, false);
    let micro = w.launch(&client, InstanceType::T3Micro, false).expect("t3.micro is not faulted");

    assert_eq!(code_and_status(small), ("InsufficientInstanceCapacity".to_string(), 500));
    let alive: Vec<(String, String)> = w.moto.instances().into_iter().map(|i| (i.id, i.instance_type)).collect();
    assert_eq!(alive, vec![(micro, "t3.micro".to_string())]);
    assert_eq!((w.proxy.count("RunInstances"), w.proxy.injected("RunInstances")), (2, 1));
}

#[test]
fn spot_and_zone_faults_carry_ec2_codes_and_match_the_market_type() {
    let w = world();
    // The first rule is limited to one injection, so the second spot launch meets the next rule.
    w.proxy.add(
        Rule::on("RunInstances").when("InstanceMarketOptions.MarketType", "spot").fault(Fault::SpotCapacity).limit(1),
    );
    w.proxy.add(Rule::on("RunInstances").when("InstanceMarketOptions.MarketType", "spot").fault(Fault::SpotLimit));
    w.proxy.add(Rule::on("RunInstances").when("InstanceType", "t3.nano").fault(Fault::Unsupported));
    let client = w.one_shot();

    let no_capacity = w.launch(&client, InstanceType::T3Small, true);
    let no_quota = w.launch(&client, InstanceType::T3Small, true);
    let not_here = w.launch(&client, InstanceType::T3Nano, false);
    let on_demand = w.launch(&client, InstanceType::T3Small, false).expect("on-demand t3.small is not faulted");

    assert_eq!(code_and_status(no_capacity), ("InsufficientInstanceCapacity".to_string(), 500));
    assert_eq!(code_and_status(no_quota), ("MaxSpotInstanceCountExceeded".to_string(), 400));
    assert_eq!(code_and_status(not_here), ("Unsupported".to_string(), 400));
    let ids: Vec<String> = w.moto.instances().into_iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![on_demand]);
    let faults: Vec<Option<Fault>> = w.proxy.calls().into_iter().map(|c| c.fault).collect();
    assert_eq!(faults, vec![Some(Fault::SpotCapacity), Some(Fault::SpotLimit), Some(Fault::Unsupported), None]);
}

#[test]
fn drop_after_serve_loses_the_answer_but_moto_launched_the_instance() {
    let w = world();
    w.proxy.add(Rule::on("RunInstances").fault(Fault::DropAfterServe).limit(1));
    let client = w.one_shot();

    let err = w.launch(&client, InstanceType::T3Small, false).expect_err("the answer was dropped");

    assert!(
        matches!(*err, SdkError::DispatchFailure(_) | SdkError::ResponseError(_)),
        "a dropped answer is a transport failure to the SDK, got {err:?}"
    );
    let launched = w.moto.instances();
    assert_eq!(launched.len(), 1, "moto served the dropped launch: {launched:?}");
    assert_eq!(launched[0].tag("paddock:cluster"), Some("proxy-test"));
    let calls = w.proxy.calls();
    assert_eq!(calls[0].fault, Some(Fault::DropAfterServe));
    assert!(calls[0].forwarded);
    // The rule is spent, and the same client works on: only that one connection was closed.
    w.launch(&client, InstanceType::T3Small, false).expect("the next launch is answered");
    assert_eq!(w.moto.instances().len(), 2);
}

/// Makes `n` DescribeInstances calls through a proxy seeded with `seed` that fails a fifth of
/// them; returns which ones failed.
fn failures(moto: &Moto, seed: u64, n: usize) -> Vec<bool> {
    let proxy = FaultProxy::with_seed(&moto.endpoint(), seed);
    proxy.add(Rule::on("DescribeInstances").fault(Fault::ServerError).rate(0.2));
    let client = proxy.client(RetryConfig::disabled());
    let failed: Vec<bool> = (0..n).map(|_| moto.block_on(client.describe_instances().send()).is_err()).collect();
    let recorded: Vec<bool> = proxy.calls().iter().map(|c| c.fault == Some(Fault::ServerError)).collect();
    assert_eq!(recorded, failed, "the proxy's record must match what the SDK saw");
    failed
}

#[test]
fn rate_is_drawn_from_seeded_dice_so_runs_repeat() {
    let moto = Moto::start();

    let first = failures(&moto, 7, 50);
    let again = failures(&moto, 7, 50);
    let other = failures(&moto, 8, 50);

    let share = first.iter().filter(|f| **f).count();
    assert!((4..=18).contains(&share), "about a fifth of 50 should fail, {share} did");
    assert_eq!(first, again, "the same seed must give the same sequence");
    assert_ne!(first, other, "another seed gives another sequence");
}

#[test]
fn latency_delays_the_answer_and_can_precede_a_fault() {
    let w = world();
    let latency = Duration::from_millis(400);
    w.proxy.add(Rule::on("DescribeInstances").fault(Fault::Latency(latency)));
    w.proxy.add(Rule::on("DescribeInstances").fault(Fault::Throttle).limit(1));
    let client = w.one_shot();

    let started = Instant::now();
    let throttled = w.moto.block_on(client.describe_instances().send()).map_err(Box::new);
    let slow_error = started.elapsed();
    let started = Instant::now();
    w.moto.block_on(client.describe_instances().send()).expect("the second call is only delayed");
    let slow_answer = started.elapsed();

    assert_eq!(code_and_status(throttled).0, "RequestLimitExceeded");
    assert!(slow_error >= latency, "the error came after {slow_error:?}, before the {latency:?} latency");
    assert!(slow_answer >= latency, "the answer came after {slow_answer:?}, before the {latency:?} latency");
    let calls = w.proxy.calls();
    assert_eq!(
        calls.iter().map(|c| (c.fault.clone(), c.delay, c.forwarded)).collect::<Vec<_>>(),
        vec![(Some(Fault::Throttle), latency, false), (Some(Fault::Latency(latency)), latency, true)]
    );
}

#[test]
fn standard_retry_rides_out_a_limited_throttle() {
    let w = world();
    w.proxy.add(Rule::on("RunInstances").fault(Fault::Throttle).limit(2));
    // Standard mode with its 3 attempts is what a client gets by default.
    let client = w.proxy.client(RetryConfig::standard());

    let id = w.launch(&client, InstanceType::T3Small, false).expect("the third attempt gets through");

    assert_eq!((w.proxy.count("RunInstances"), w.proxy.injected("RunInstances")), (3, 2));
    let ids: Vec<String> = w.moto.instances().into_iter().map(|i| i.id).collect();
    assert_eq!(ids, vec![id]);
    // Retries of one call carry the same idempotency token; real EC2 would dedupe them.
    let tokens: Vec<Option<String>> =
        w.proxy.calls().into_iter().map(|c| c.params.get("ClientToken").cloned()).collect();
    assert!(tokens[0].is_some() && tokens.iter().all(|t| *t == tokens[0]), "{tokens:?}");
}

#[test]
fn clear_removes_the_rules_but_keeps_the_record() {
    let w = world();
    w.proxy.add(Rule::any().fault(Fault::ServerError));
    let client = w.one_shot();
    assert!(w.moto.block_on(client.describe_instances().send()).is_err());

    w.proxy.clear();

    w.moto.block_on(client.describe_instances().send()).expect("no rule is left");
    let seen = w.proxy.wait_calls("DescribeInstances", 2);
    assert_eq!(seen.iter().map(|c| c.fault.clone()).collect::<Vec<_>>(), vec![Some(Fault::ServerError), None]);
    assert_eq!(w.proxy.max_in_window("DescribeInstances", Duration::from_secs(3600)), 2);
}

#[test]
fn busiest_window_counts_a_half_open_sliding_window() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    // Out of order on purpose: arrival order is not guaranteed to be sorted by the caller.
    let times = [at(0), at(100), at(1000), at(200), at(1100), at(1150), at(1199), at(3000)];

    assert_eq!(busiest_window(&times, Duration::from_millis(200)), 4, "1000, 1100, 1150, 1199");
    assert_eq!(busiest_window(&times, Duration::from_millis(100)), 3, "1100, 1150, 1199; 1000 is just out");
    assert_eq!(busiest_window(&times, Duration::from_secs(10)), times.len());
    assert_eq!(busiest_window(&times, Duration::ZERO), 0);
    assert_eq!(busiest_window(&[], Duration::from_secs(1)), 0);
}

/// Reads one HTTP response: status, headers (lower-cased names) and body.
fn read_response(conn: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>, String) {
    let mut line = String::new();
    conn.read_line(&mut line).expect("status line");
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status code");
    let mut headers = Vec::new();
    loop {
        line.clear();
        conn.read_line(&mut line).expect("header");
        let Some((name, value)) = line.trim_end().split_once(':') else { break };
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    let len = headers.iter().find(|(n, _)| n == "content-length").map_or(0, |(_, v)| v.parse().expect("length"));
    let mut body = vec![0; len];
    conn.read_exact(&mut body).expect("body");
    (status, headers, String::from_utf8(body).expect("utf-8 body"))
}

#[test]
fn raw_http_keep_alive_chunked_bodies_and_expect_continue() {
    // Every request here is answered by a rule, so no upstream is needed behind the proxy.
    let proxy = FaultProxy::start("http://127.0.0.1:1");
    proxy.add(Rule::on("RunInstances").when("InstanceType", "t3.small").fault(Fault::Capacity));
    proxy.add(Rule::any().fault(Fault::Throttle));
    let stream = TcpStream::connect(("127.0.0.1", proxy.port)).expect("connect");
    stream.set_read_timeout(Some(common::DEADLINE)).expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let mut conn = BufReader::new(stream);

    let form = "Action=DescribeInstances&Version=2016-11-15&Filter.1.Name=tag%3Aname&Filter.1.Value.1=a+b%2Fc%";
    write!(
        writer,
        "POST / HTTP/1.1\r\nHost: ec2\r\nContent-Type: application/x-www-form-urlencoded; charset=utf-8\r\n\
         Content-Length: {}\r\n\r\n{form}",
        form.len()
    )
    .expect("send 1");
    let (status, _, body) = read_response(&mut conn);
    assert_eq!(status, 503);
    assert!(body.contains("<Code>RequestLimitExceeded</Code>"), "{body}");

    // The same connection again: a chunked body, held back until the proxy says continue.
    writer
        .write_all(
            b"POST /?Version=2016-11-15 HTTP/1.1\r\nHost: ec2\r\nContent-Type: application/x-www-form-urlencoded\r\n\
              Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n",
        )
        .expect("send 2 head");
    let mut line = String::new();
    conn.read_line(&mut line).expect("interim");
    assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
    line.clear();
    conn.read_line(&mut line).expect("interim end");
    writer
        .write_all(b"c\r\nAction=RunIn\r\n18;ext=1\r\nstances&InstanceType=t3.\r\n5\r\nsmall\r\n0\r\n\r\n")
        .expect("send 2");
    let (status, _, body) = read_response(&mut conn);
    assert_eq!(status, 500);
    assert!(body.contains("<Code>InsufficientInstanceCapacity</Code>"), "{body}");

    // Connection: close is honoured and said back.
    writer
        .write_all(b"GET /?Action=DescribeRegions HTTP/1.1\r\nHost: ec2\r\nConnection: close\r\n\r\n")
        .expect("send 3");
    let (status, headers, _) = read_response(&mut conn);
    assert_eq!(status, 503);
    assert!(headers.contains(&("connection".to_string(), "close".to_string())), "{headers:?}");
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).expect("the proxy closes");
    assert!(rest.is_empty());

    let calls = proxy.calls();
    let described = &calls[0].params;
    assert_eq!(described.get("Filter.1.Name").map(String::as_str), Some("tag:name"));
    assert_eq!(described.get("Filter.1.Value.1").map(String::as_str), Some("a b/c%"), "a stray % stays as is");
    assert_eq!(calls[1].action, "RunInstances");
    assert_eq!(calls[1].params.get("Version").map(String::as_str), Some("2016-11-15"), "query and form merge");
    assert_eq!(calls[1].params.get("InstanceType").map(String::as_str), Some("t3.small"));
    assert_eq!(calls[2].action, "DescribeRegions");
}
