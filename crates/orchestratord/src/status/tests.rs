//! The status feed's rings and caps, the log tail, and the guards of the
//! page, its feed and its login (the router in process, no engine).

use super::*;

#[test]
fn the_request_ring_keeps_the_newest_fifty() {
    let hub = Hub::default();
    for i in 0..(REQUESTS_KEPT as u64 + 20) {
        hub.record(RequestRecord {
            at_ms: i,
            api: "/v1/tasks".into(),
            pool: "p".into(),
            replica: 0,
            status: "ok".into(),
            prompt_tokens: 1,
            tokens_out: i,
            queue_wait_ms: 0,
            ttft_ms: None,
            tokens_per_s: None,
            canceled: false,
        });
    }
    let r = hub.requests();
    assert_eq!(r.len(), REQUESTS_KEPT);
    assert_eq!(r[0].tokens_out, REQUESTS_KEPT as u64 + 19, "newest first");
    assert_eq!(r[REQUESTS_KEPT - 1].tokens_out, 20);
}

#[test]
fn watchers_are_capped_and_a_stale_one_gives_its_place_up() {
    let age = STALE_WATCHER + Duration::from_secs(10);
    let hub = Arc::new(Hub {
        started: Instant::now()
            .checked_sub(age)
            .expect("the machine is up long enough"),
        ..Hub::default()
    });
    let slots: Vec<WatcherSlot> = (0..MAX_WATCHERS).map(|_| hub.join().unwrap()).collect();
    assert_eq!(hub.join().err(), Some(MAX_WATCHERS));
    // One took nothing for longer than STALE_WATCHER: it no longer counts.
    slots[0].taken.store(0, Ordering::Relaxed);
    assert_eq!(hub.live_watchers(), MAX_WATCHERS - 1);
    let extra = hub.join().expect("the stale one's place");
    // Ended streams give their places back.
    drop(slots);
    drop(extra);
    assert_eq!(hub.live_watchers(), 0);
    assert!(hub.watchers.lock().unwrap().is_empty());
}

#[test]
fn a_log_tail_is_bounded_and_drops_a_cut_line() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("e.log");
    let line = "x".repeat(99);
    let text: String = (0..2_000).map(|i| format!("{i:05} {line}\n")).collect();
    fs_err::write(&log, &text).unwrap();
    let t = tail(&log);
    assert_eq!(t.len(), LOG_TAIL_LINES);
    assert!(t.last().unwrap().starts_with("01999 "));
    assert!(t.iter().all(|l| l.len() == 105), "no cut line");
    assert!(tail(&dir.path().join("missing.log")).is_empty());
    // A FIFO or a link in the log's place is no log (and never blocks).
    let fifo = dir.path().join("fifo.log");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    assert!(tail(&fifo).is_empty());
    let link = dir.path().join("link.log");
    fs_err::os::unix::fs::symlink(&log, &link).unwrap();
    assert!(tail(&link).is_empty());
    // Bytes that are not UTF-8 are shown, not refused.
    fs_err::write(&log, b"a\xff\xfeb\n").unwrap();
    assert_eq!(tail(&log), vec!["a\u{fffd}\u{fffd}b".to_string()]);
}

#[test]
fn state_changes_are_kept_once_and_a_ready_engine_starting_again_is_a_restart() {
    let mut seen = super::monitor::Seen::default();
    let saw = |s: &mut super::monitor::Seen, st: &str| s.saw("p.r1", "p", 1, st);
    assert!(saw(&mut seen, "unloaded"));
    assert!(!saw(&mut seen, "unloaded"), "no change, no event");
    for st in [
        "loading",
        "ready",
        "loading",
        "ready",
        "unloading",
        "unloaded",
    ] {
        assert!(saw(&mut seen, st));
    }
    let r = &seen.replicas["p.r1"];
    assert_eq!(
        r.restarts, 1,
        "ready -> loading once; an unload is no restart"
    );
    assert!(r.ready_since.is_none());
    let to: Vec<&str> = seen.events.iter().map(|e| e.to.as_str()).collect();
    assert_eq!(
        to,
        [
            "unloaded",
            "unloading",
            "ready",
            "loading",
            "ready",
            "loading",
            "unloaded"
        ]
    );
    assert_eq!(seen.events.back().unwrap().from, "-");
    for i in 0..EVENTS_KEPT {
        saw(&mut seen, if i % 2 == 0 { "loading" } else { "ready" });
    }
    assert_eq!(seen.events.len(), EVENTS_KEPT, "a fixed ring");
}

mod http {
    use crate::status::COOKIE;
    use axum::body::Body;
    use axum::http::{header, Request, StatusCode};
    use tower::ServiceExt;

    fn app(token: Option<&str>) -> axum::Router {
        let cfg = crate::Config {
            api_token: token.map(String::from),
            ..Default::default()
        };
        let st = crate::AppState::new(
            cfg,
            crate::pool::tests::ready_specs(2, crate::Affinity::None),
            crate::scheduler::SchedulerConfig::default(),
        );
        crate::api::router(st)
    }

    fn get(path: &str, cookie: Option<&str>) -> Request<Body> {
        let mut r = Request::get(path).header(header::HOST, "127.0.0.1:8080");
        if let Some(c) = cookie {
            r = r.header(header::COOKIE, c);
        }
        r.body(Body::empty()).unwrap()
    }

    fn post(path: &str, body: &str, cookie: Option<&str>) -> Request<Body> {
        let mut r = Request::post(path)
            .header(header::HOST, "127.0.0.1:8080")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(c) = cookie {
            r = r.header(header::COOKIE, c);
        }
        r.body(Body::from(body.to_string())).unwrap()
    }

    async fn text(r: axum::response::Response) -> String {
        let b = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        String::from_utf8_lossy(&b).into_owned()
    }

    #[tokio::test]
    async fn the_token_opens_the_page_through_a_cookie_that_never_opens_the_task_api() {
        let app = app(Some("s3cret"));
        // Without the token: the login form, guarded like every status response.
        let r = app.clone().oneshot(get("/status", None)).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let csp = r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .to_string();
        assert!(csp.starts_with("default-src 'self'"), "{csp}");
        let page = text(r).await;
        assert!(
            page.contains("id=\"login\"") && !page.contains("<table"),
            "{page}"
        );
        for path in ["/v1/status", "/v1/status/events", "/v1/status/pools/p/log"] {
            let r = app.clone().oneshot(get(path, None)).await.unwrap();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        }
        // The script and style need no token (they hold no data).
        let r = app
            .clone()
            .oneshot(get("/status/app.js", None))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/javascript"));
        // A wrong token sets nothing; the right one sets an HttpOnly, same-site cookie.
        let r = app
            .clone()
            .oneshot(post("/status/login", r#"{"token":"nope"}"#, None))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        assert!(r.headers().get(header::SET_COOKIE).is_none());
        let r = app
            .clone()
            .oneshot(post("/status/login", r#"{"token":"s3cret"}"#, None))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let set = r.headers()[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            set.contains("HttpOnly") && set.contains("SameSite=Strict"),
            "{set}"
        );
        let cookie = format!("{COOKIE}=s3cret");
        // The cookie opens the page and the feed…
        let r = app
            .clone()
            .oneshot(get("/status", Some(&cookie)))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert!(text(r).await.contains("<table id=\"pools\">"));
        let r = app
            .clone()
            .oneshot(get("/v1/status", Some(&cookie)))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = app
            .clone()
            .oneshot(get("/v1/status/events", Some(&cookie)))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "text/event-stream");
        // …and nothing else: not the task API, not capabilities.
        let r = app
            .clone()
            .oneshot(post("/v1/tasks", r#"{"prompt":"x"}"#, Some(&cookie)))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let r = app
            .clone()
            .oneshot(get("/v1/capabilities", Some(&cookie)))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        // A wrong cookie is no cookie.
        let r = app
            .clone()
            .oneshot(get("/v1/status", Some(&format!("{COOKIE}=s3cre"))))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn a_foreign_host_and_an_unknown_pool_are_refused() {
        let app = app(None);
        let r = app
            .clone()
            .oneshot(
                Request::get("/status")
                    .header(header::HOST, "evil.example")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        let r = app
            .clone()
            .oneshot(get("/v1/status/pools/nope/log", None))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = app
            .clone()
            .oneshot(get("/v1/status/pools/p/log", None))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let r = app.clone().oneshot(get("/status", None)).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::X_FRAME_OPTIONS], "DENY");
    }
}
