//! Unit tests of the configuration: precedence, defaults, ranges, errors
//! that name the setting, secrets that never reach an error.

use super::*;

const SECRET: &str = "mVtpP-Iz85lBRJdiBbQ9KzZo4cCi7lxIHt-j7T6yOGU=";

fn base() -> Options {
    Options {
        brain_url: Some("http://127.0.0.1:7711".into()),
        token: Some("tok-abc".into()),
        hmac_secret: Some(SECRET.into()),
        ..Options::default()
    }
}

fn host() -> HostEnv {
    HostEnv {
        home: Some("/home/u".into()),
        tmpdir: "/tmp".into(),
        uid: 1000,
        hostname: "web-1".into(),
        ..HostEnv::default()
    }
}

#[test]
fn defaults_resolve() {
    let c = base().resolve(host()).unwrap();
    assert_eq!(c.uplink.endpoint.ws_url, "ws://127.0.0.1:7711/ws/agent");
    assert_eq!(c.uplink.worker_id, "agentd-web-1");
    assert_eq!(c.uplink.agent_name, "web-1");
    assert_eq!(c.socket_mode, 0o660);
    assert_eq!(c.buffer_overflow, Overflow::DropOldest);
    assert_eq!(c.uplink.batch_max_events, 250);
}

#[test]
fn https_becomes_wss_and_keeps_path() {
    let e = parse_brain_url("https://z4j.example.com/base/", false).unwrap();
    assert_eq!(e.ws_url, "wss://z4j.example.com/base/ws/agent");
    assert!(e.tls);
}

#[test]
fn plain_ws_to_remote_host_refused_without_dev_mode() {
    let err = parse_brain_url("http://brain.internal:7711", false).unwrap_err();
    assert_eq!(err.key, "Z4J_BRAIN_URL");
    assert!(err.message.contains("Z4J_DEV_MODE"), "{}", err.message);
    assert!(parse_brain_url("http://brain.internal:7711", true).is_ok());
    for ok in ["http://localhost:1", "http://127.0.0.1:1", "http://[::1]:1"] {
        assert!(parse_brain_url(ok, false).is_ok(), "{ok}");
    }
}

#[test]
fn short_secret_refused_without_echoing_it() {
    let mut o = base();
    o.hmac_secret = Some("c2hvcnQtc2VjcmV0".into()); // "short-secret"
    let err = o.resolve(host()).unwrap_err();
    assert_eq!(err.key, "Z4J_HMAC_SECRET");
    assert!(!err.to_string().contains("c2hvcnQtc2VjcmV0"));
}

#[test]
fn missing_token_names_the_key() {
    let mut o = base();
    o.token = None;
    let err = o.resolve(host()).unwrap_err();
    assert_eq!(err.key, "Z4J_TOKEN");
}

#[test]
fn secrets_from_files_and_credentials_directory() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "from-cred\n").unwrap();
    std::fs::write(dir.path().join("hmac_secret"), format!("{SECRET}\n")).unwrap();
    let mut o = base();
    o.token = None;
    o.hmac_secret = None;
    let mut h = host();
    h.credentials_directory = Some(dir.path().to_path_buf());
    let c = o.resolve(h.clone()).unwrap();
    assert_eq!(c.uplink.token.expose(), "from-cred");

    let tf = dir.path().join("tok2");
    std::fs::write(&tf, "from-file").unwrap();
    o.token_file = Some(tf);
    let c = o.resolve(h).unwrap();
    assert_eq!(c.uplink.token.expose(), "from-file");
}

#[test]
fn flags_beat_file_values() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.toml");
    std::fs::write(
        &path,
        "agent_name = \"from-file\"\nbatch_max_events = 100\nengines = [\"celery\", \"rq\"]\n",
    )
    .unwrap();
    let mut o = base();
    o.config = Some(path);
    o.agent_name = Some("from-flag".into());
    let c = o.resolve(host()).unwrap();
    assert_eq!(c.uplink.agent_name, "from-flag");
    assert_eq!(c.uplink.batch_max_events, 100);
    assert_eq!(c.uplink.static_engines, vec!["celery", "rq"]);
}

#[test]
fn unknown_file_key_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.toml");
    std::fs::write(&path, "brain_ulr = \"x\"\n").unwrap();
    let mut o = base();
    o.config = Some(path);
    let err = o.resolve(host()).unwrap_err();
    assert_eq!(err.key, "Z4J_CONFIG");
    assert!(err.message.contains("brain_ulr"), "{}", err.message);
}

#[test]
fn bad_numbers_and_enums_name_their_key() {
    let mut o = base();
    o.batch_max_events = Some("9000".into());
    assert_eq!(o.resolve(host()).unwrap_err().key, "Z4J_BATCH_MAX_EVENTS");
    let mut o = base();
    o.buffer_overflow = Some("drop_everything".into());
    assert_eq!(o.resolve(host()).unwrap_err().key, "Z4J_BUFFER_OVERFLOW");
    let mut o = base();
    o.socket_mode = Some("0999".into());
    assert_eq!(o.resolve(host()).unwrap_err().key, "Z4J_SOCKET_MODE");
    let mut o = base();
    o.log_format = Some("xml".into());
    assert_eq!(o.resolve(host()).unwrap_err().key, "Z4J_LOG_FORMAT");
}

#[test]
fn debug_output_has_no_secret() {
    let c = base().resolve(host()).unwrap();
    let dbg = format!("{c:?}");
    assert!(!dbg.contains("tok-abc"));
    assert!(!dbg.contains(SECRET));
}

#[test]
fn metrics_listener_is_off_by_default_and_loopback_only() {
    assert_eq!(base().resolve(host()).unwrap().metrics_addr, None);
    let o = Options {
        metrics_addr: Some("127.0.0.1:9464".into()),
        ..base()
    };
    assert_eq!(
        o.resolve(host()).unwrap().metrics_addr,
        Some("127.0.0.1:9464".parse().unwrap())
    );
    let o = Options {
        metrics_addr: Some("localhost:9464".into()),
        ..base()
    };
    assert!(o.resolve(host()).unwrap().metrics_addr.is_some());
    let o = Options {
        metrics_addr: Some("0.0.0.0:9464".into()),
        ..base()
    };
    let e = o.resolve(host()).unwrap_err();
    assert_eq!(e.key, "Z4J_METRICS_ADDR");
    assert!(
        e.message.contains("Z4J_METRICS_ALLOW_REMOTE"),
        "{}",
        e.message
    );
    let o = Options {
        metrics_addr: Some("0.0.0.0:9464".into()),
        metrics_allow_remote: Some("true".into()),
        ..base()
    };
    assert!(o.resolve(host()).unwrap().metrics_addr.is_some());
    let o = Options {
        metrics_addr: Some("9464".into()),
        ..base()
    };
    let e = o.resolve(host()).unwrap_err();
    assert!(e.message.contains("127.0.0.1:9464"), "{}", e.message);
}

#[test]
fn the_gateway_is_off_by_default_and_listens_on_loopback_only() {
    assert!(base().resolve(host()).unwrap().gateway.is_none());
    let o = Options {
        gateway_addr: Some("localhost:7700".into()),
        ..base()
    };
    let g = o.resolve(host()).unwrap().gateway.expect("gateway on");
    assert_eq!(g.addr, "127.0.0.1:7700".parse().unwrap());
    assert_eq!(g.max_connections, 256);
    assert_eq!(g.tokens_file, None);
    for addr in ["0.0.0.0:7700", "[::]:7700", "192.0.2.10:7700"] {
        let o = Options {
            gateway_addr: Some(addr.into()),
            ..base()
        };
        let e = o.resolve(host()).unwrap_err();
        assert_eq!(e.key, "Z4J_GATEWAY_ADDR", "{addr}");
        assert!(
            e.message.contains("not a loopback address") && e.message.contains("127.0.0.1:<port>"),
            "{addr}: {}",
            e.message
        );
        assert!(e.to_string().contains("Z4J_GATEWAY_ADDR"), "{e}");
    }
    let o = Options {
        gateway_addr: Some("7700".into()),
        ..base()
    };
    let e = o.resolve(host()).unwrap_err();
    assert_eq!(e.key, "Z4J_GATEWAY_ADDR");
    assert!(e.message.contains("127.0.0.1:7700"), "{}", e.message);
}

#[test]
fn static_capabilities_from_the_environment_or_the_file() {
    let o = Options {
        capabilities: Some("celery:cancel_task, retry_task; rq:cancel_task".into()),
        ..base()
    };
    let c = o.resolve(host()).unwrap().uplink.static_capabilities;
    assert_eq!(c["celery"], ["cancel_task", "retry_task"]);
    assert_eq!(c["rq"], ["cancel_task"]);

    let e = Options {
        capabilities: Some("celery".into()),
        ..base()
    }
    .resolve(host())
    .unwrap_err();
    assert_eq!(e.key, "Z4J_CAPABILITIES");
    assert!(e.message.contains("celery:cancel_task"), "{}", e.message);

    let e = Options {
        capabilities: Some("celery:retry_by_reference_v1".into()),
        ..base()
    }
    .resolve(host())
    .unwrap_err();
    assert!(e.message.contains("connected client"), "{}", e.message);

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("agentd.toml");
    std::fs::write(&f, "[capabilities]\ncelery = [\"cancel_task\"]\n").unwrap();
    let o = Options {
        config: Some(f),
        ..base()
    };
    let c = o.resolve(host()).unwrap().uplink.static_capabilities;
    assert_eq!(c["celery"], ["cancel_task"]);
}

/// Resolves `o` on another thread and fails the test, instead of
/// hanging it, when that takes more than 5 s (a FIFO read would).
fn resolve_bounded(o: Options) -> Result<Config, ConfigError> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(o.resolve(host()));
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("resolve returned within 5 s")
}

/// Paths that are not regular files, or too large, each with the
/// words the error must contain.
fn hostile_files(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let fifo = dir.join("fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success());
    let huge = dir.join("huge");
    // Sparse: 1 GiB that takes no disk space.
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let zero_link = dir.join("zero");
    std::os::unix::fs::symlink("/dev/zero", &zero_link).unwrap();
    vec![
        (fifo, "is a FIFO (named pipe), not a regular file"),
        (
            "/dev/zero".into(),
            "is a character device, not a regular file",
        ),
        (zero_link, "is a character device, not a regular file"),
        (dir.to_path_buf(), "is a directory, not a regular file"),
        (huge, "is larger than"),
    ]
}

#[test]
fn secret_files_that_are_not_small_regular_files_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let just_over = dir.path().join("just-over");
    std::fs::write(
        &just_over,
        "a".repeat(super::small_file::MAX_SECRET_FILE_BYTES as usize + 1),
    )
    .unwrap();
    let mut cases = hostile_files(dir.path());
    cases.push((just_over, "is larger than 4096 bytes"));
    for (path, words) in cases {
        let o = Options {
            token: None,
            token_file: Some(path.clone()),
            ..base()
        };
        let e = resolve_bounded(o).unwrap_err();
        assert_eq!(e.key, "Z4J_TOKEN_FILE", "{e}");
        assert!(e.message.contains(words), "{path:?}: {e}");
        assert!(e.message.contains("point Z4J_TOKEN_FILE at"), "{e}");
        assert!(e.message.contains(&path.display().to_string()), "{e}");

        let o = Options {
            hmac_secret: None,
            hmac_secret_file: Some(path.clone()),
            ..base()
        };
        let e = resolve_bounded(o).unwrap_err();
        assert_eq!(e.key, "Z4J_HMAC_SECRET_FILE", "{e}");
        assert!(e.message.contains(words), "{path:?}: {e}");
        assert!(e.message.contains("HMAC secret"), "{e}");
    }
    // The systemd credential too, naming where it comes from.
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::os::unix::fs::symlink("/dev/zero", creds.join("token")).unwrap();
    let o = Options {
        token: None,
        ..base()
    };
    let mut h = host();
    h.credentials_directory = Some(creds);
    let e = o.resolve(h).unwrap_err();
    assert_eq!(e.key, "Z4J_TOKEN");
    assert!(e.message.contains("character device"), "{e}");
    assert!(e.message.contains("LoadCredential="), "{e}");
}

#[test]
fn a_ca_file_or_config_file_that_is_not_a_small_regular_file_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for (path, words) in hostile_files(dir.path()) {
        // The 1 GiB file is over both limits.
        let o = Options {
            ca_file: Some(path.clone()),
            ..base()
        };
        let e = resolve_bounded(o).unwrap_err();
        assert_eq!(e.key, "Z4J_CA_FILE", "{e}");
        assert!(e.message.contains(words), "{path:?}: {e}");
        assert!(e.message.contains("PEM file of the CA"), "{e}");

        let o = Options {
            config: Some(path.clone()),
            ..base()
        };
        let e = resolve_bounded(o).unwrap_err();
        assert_eq!(e.key, "Z4J_CONFIG", "{e}");
        assert!(e.message.contains(words), "{path:?}: {e}");
    }
    let o = Options {
        ca_file: Some(dir.path().join("missing.pem")),
        ..base()
    };
    let e = o.resolve(host()).unwrap_err();
    assert!(e.message.contains("does not exist"), "{e}");
}

#[test]
fn a_byte_order_mark_and_whitespace_around_a_secret_are_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let tf = dir.path().join("token");
    std::fs::write(&tf, "\u{feff}tok-from-notepad\r\n").unwrap();
    let sf = dir.path().join("secret");
    std::fs::write(&sf, format!("\u{feff} {SECRET}\r\n")).unwrap();
    let o = Options {
        token: None,
        token_file: Some(tf),
        hmac_secret: None,
        hmac_secret_file: Some(sf),
        ..base()
    };
    let c = o.resolve(host()).unwrap();
    assert_eq!(c.uplink.token.expose(), "tok-from-notepad");
    let expected = SigningKey::from_base64(SECRET).unwrap();
    assert_eq!(format!("{:?}", c.uplink.key), format!("{expected:?}"));
    // The same in the variable itself.
    let o = Options {
        token: Some("\u{feff}tok-abc".into()),
        ..base()
    };
    assert_eq!(o.resolve(host()).unwrap().uplink.token.expose(), "tok-abc");
}

#[test]
fn a_token_with_a_character_the_brain_never_mints_is_refused_without_echoing_it() {
    for bad in ["zq9\u{2019}abc", "zq9\u{200b}abc", "zq9\u{feff}abc", "zq9é"] {
        let o = Options {
            token: Some(bad.into()),
            ..base()
        };
        let e = o.resolve(host()).unwrap_err();
        assert_eq!(e.key, "Z4J_TOKEN");
        assert!(e.message.contains("printable ASCII"), "{e}");
        assert!(e.message.contains("character 4"), "{e}");
        assert!(!e.to_string().contains("zq9"), "{e}");
    }
}

#[test]
fn a_relative_socket_path_is_refused_naming_the_setting() {
    for rel in [
        "agent.sock",
        "run/agent.sock",
        "./agent.sock",
        "../agent.sock",
    ] {
        let o = Options {
            socket_path: Some(rel.into()),
            ..base()
        };
        let e = o.resolve(host()).unwrap_err();
        assert_eq!(e.key, "Z4J_SOCKET_PATH", "{e}");
        assert!(e.message.contains(rel), "{e}");
        assert!(e.message.contains("absolute path"), "{e}");
    }
    // The config file's socket_path too.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("agentd.toml");
    std::fs::write(&f, "socket_path = \"agent.sock\"\n").unwrap();
    let o = Options {
        config: Some(f),
        ..base()
    };
    assert_eq!(o.resolve(host()).unwrap_err().key, "Z4J_SOCKET_PATH");
    // A default built from a relative $TMPDIR names where it came from.
    let mut h = host();
    h.tmpdir = "tmp".into();
    let e = base().resolve(h).unwrap_err();
    assert_eq!(e.key, "Z4J_SOCKET_PATH");
    assert!(e.message.contains("$TMPDIR"), "{e}");
    // Absolute paths are fine.
    let o = Options {
        socket_path: Some("/run/z4j/agent.sock".into()),
        ..base()
    };
    assert!(o.resolve(host()).is_ok());
}

#[test]
fn localhost_in_any_case_with_or_without_its_trailing_dot_is_loopback() {
    for ok in [
        "http://localhost.:7711",
        "http://LOCALHOST:7711",
        "http://LocalHost.:7711",
        "ws://localhost./base",
        "http://127.0.0.2:7711",
        "http://[::ffff:127.0.0.1]:7711",
    ] {
        let e = parse_brain_url(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert!(!e.tls);
    }
    // The dotted form connects to the plain name.
    let e = parse_brain_url("http://LocalHost.:7711/base", false).unwrap();
    assert_eq!(e.ws_url, "ws://localhost:7711/base/ws/agent");
    assert_eq!(e.host, "localhost");
    for remote in [
        "http://localhost.evil.example:7711",
        "http://localhostx:7711",
        "http://my.localhost:7711",
        "http://127.0.0.1.nip.io:7711",
        "http://[::ffff:10.0.0.1]:7711",
        "http://localhost..:7711",
    ] {
        match parse_brain_url(remote, false) {
            Err(e) => assert!(e.message.contains("Z4J_DEV_MODE"), "{remote}: {e}"),
            Ok(e) => panic!("{remote} taken as loopback: {e:?}"),
        }
    }
    // The metrics address follows the same rule.
    for ok in [
        "localhost.:9464",
        "LOCALHOST:9464",
        "[::ffff:127.0.0.1]:9464",
    ] {
        let a = endpoints::parse_metrics_addr(ok, false).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_eq!(a.port(), 9464);
    }
}

/// Options with nothing but the given environment.
fn with_env(pairs: &[(&str, &str)]) -> Options {
    Options {
        env: pairs.iter().map(|(k, v)| (*k, *v)).collect(),
        ..Options::default()
    }
}

/// The environment `base()` gives as flags, as variables instead.
fn base_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("Z4J_BRAIN_URL", "http://127.0.0.1:7711"),
        ("Z4J_TOKEN", "tok-abc"),
        ("Z4J_HMAC_SECRET", SECRET),
    ]
}

#[test]
fn flags_beat_the_environment_which_beats_the_file_which_beats_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.toml");
    std::fs::write(
        &path,
        "agent_name = \"from-file\"\nworker_id = \"w-file\"\ninflight_frames = 3\n",
    )
    .unwrap();
    let mut env = base_env();
    let config = path.to_str().unwrap();
    env.extend([
        ("Z4J_CONFIG", config),
        ("Z4J_AGENT_NAME", "from-env"),
        ("Z4J_WORKER_ID", "w-env"),
    ]);
    let mut o = with_env(&env);
    o.agent_name = Some("from-flag".into());
    let c = o.resolve(host()).unwrap();
    assert_eq!(c.uplink.agent_name, "from-flag");
    assert_eq!(c.uplink.worker_id, "w-env");
    assert_eq!(c.uplink.inflight_frames, 3);
    assert_eq!(c.max_clients, 1024);
    // The environment alone is a whole configuration.
    let c = with_env(&base_env()).resolve(host()).unwrap();
    assert_eq!(c.uplink.token.expose(), "tok-abc");
    assert_eq!(c.uplink.endpoint.ws_url, "ws://127.0.0.1:7711/ws/agent");
}

#[test]
fn an_empty_flag_or_variable_counts_as_not_given() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.toml");
    std::fs::write(&path, "log_level = \"debug\"\n").unwrap();
    let mut env = base_env();
    let config = path.to_str().unwrap();
    env.extend([("Z4J_CONFIG", config), ("Z4J_LOG_LEVEL", " ")]);
    let mut o = with_env(&env);
    o.log_level = Some(String::new());
    assert_eq!(o.resolve(host()).unwrap().log_level, "debug");
    let mut env = base_env();
    env.push(("Z4J_LOG_FORMAT", "json"));
    let mut o = with_env(&env);
    o.log_format = Some(String::new());
    assert_eq!(o.resolve(host()).unwrap().log_format, LogFormat::Json);
}

#[test]
fn a_bad_variable_names_itself_with_the_same_words_as_a_bad_flag() {
    let cases = [
        (
            "Z4J_BATCH_MAX_EVENTS",
            "9000",
            "must be between 1 and 5000, got 9000",
        ),
        (
            "Z4J_BUFFER_OVERFLOW",
            "DROP_OLDEST",
            "expected drop_oldest, drop_newest or block, got \"DROP_OLDEST\"",
        ),
        (
            "Z4J_BUFFER_SYNCHRONOUS",
            "Sometimes",
            "expected normal or full, got \"sometimes\"",
        ),
        (
            "Z4J_SOCKET_MODE",
            "0400",
            "0400 must be a permission mode that keeps owner read/write, e.g. 0660",
        ),
        (
            "Z4J_DEV_MODE",
            "maybe",
            "expected true or false, got \"maybe\"",
        ),
        (
            "Z4J_ALLOWED_GIDS",
            "1,x",
            "expected numeric ids separated by commas, got \"x\"",
        ),
        (
            "Z4J_BUFFER_MAX_BYTES",
            "lots",
            "expected a whole number, got \"lots\"",
        ),
    ];
    for (var, value, words) in cases {
        let mut env = base_env();
        env.push((var, value));
        let e = with_env(&env).resolve(host()).unwrap_err();
        assert_eq!(e.key, var, "{e}");
        assert_eq!(e.message, words, "{e}");
    }
}

#[test]
fn a_variable_that_is_not_utf8_is_refused_naming_it() {
    use std::os::unix::ffi::OsStringExt;
    let mut o = base();
    o.env = [("Z4J_AGENT_NAME", std::ffi::OsString::from_vec(vec![0xff]))]
        .into_iter()
        .collect();
    let e = o.resolve(host()).unwrap_err();
    assert_eq!(e.key, "Z4J_AGENT_NAME");
}

#[test]
fn secrets_in_the_environment_stay_out_of_debug_output() {
    let o = with_env(&base_env());
    let dbg = format!("{:?} {:?}", o.env, o.resolve(host()).unwrap());
    assert!(dbg.contains("Z4J_TOKEN"), "{dbg}");
    assert!(!dbg.contains("tok-abc") && !dbg.contains(SECRET), "{dbg}");
}

#[test]
fn every_setting_has_its_variable_flag_and_file_key_from_one_name() {
    let mut names = std::collections::BTreeSet::new();
    for key in ALL {
        assert!(names.insert(key.name), "{} twice", key.name);
        assert_eq!(key.env, format!("Z4J_{}", key.name.to_uppercase()));
        assert_eq!(key.flag(), key.name.replace('_', "-"));
        assert!(
            !key.help.trim().ends_with('.'),
            "{}: clap drops the period",
            key.name
        );
    }
    let not_in_file: Vec<_> = ALL
        .iter()
        .filter(|k| !k.kind.in_file())
        .map(|k| k.name)
        .collect();
    assert_eq!(not_in_file, ["config", "token", "hmac_secret"]);
    // The help states the default the reader applies.
    for (key, default) in [
        (
            &SPOOL_MAX_EVENTS.key,
            SPOOL_MAX_EVENTS.read.default.to_string(),
        ),
        (
            &SPOOL_MAX_BYTES.key,
            SPOOL_MAX_BYTES.read.default.to_string(),
        ),
        (&MAX_CLIENTS.key, MAX_CLIENTS.read.default.to_string()),
        (
            &BATCH_MAX_EVENTS.key,
            BATCH_MAX_EVENTS.read.default.to_string(),
        ),
        (
            &INFLIGHT_FRAMES.key,
            INFLIGHT_FRAMES.read.default.to_string(),
        ),
        (
            &ACK_TIMEOUT_SECONDS.key,
            ACK_TIMEOUT_SECONDS.read.default.to_string(),
        ),
        (
            &SHUTDOWN_GRACE_SECONDS.key,
            SHUTDOWN_GRACE_SECONDS.read.default.to_string(),
        ),
        (&SOCKET_MODE.key, format!("0{:o}", SOCKET_MODE.read.default)),
        (&LOG_LEVEL.key, LOG_LEVEL.read.default.to_string()),
        (
            &SPOOL_OVERFLOW.key,
            format!("{} (default)", SPOOL_OVERFLOW.read.choices[0].0),
        ),
        (
            &SPOOL_SYNCHRONOUS.key,
            format!("{} (default)", SPOOL_SYNCHRONOUS.read.choices[0].0),
        ),
        (
            &LOG_FORMAT.key,
            format!("{} (default)", LOG_FORMAT.read.choices[0].0),
        ),
    ] {
        assert!(
            key.help.contains(&default),
            "{}: {default} not in {:?}",
            key.name,
            key.help
        );
    }
}

#[test]
fn each_flag_on_the_command_line_lands_in_its_own_setting() {
    use clap::{Args, FromArgMatches};
    let cmd = Options::augment_args(clap::Command::new("t"));
    for key in ALL {
        let flag = format!("--{}", key.flag());
        let m = cmd
            .clone()
            .try_get_matches_from(["t", flag.as_str(), "/v"])
            .unwrap();
        let o = Options::from_arg_matches(&m).unwrap();
        let want = match key.kind.is_path() {
            true => read::Raw::Path("/v".into()),
            false => read::Raw::Text("/v".into()),
        };
        assert_eq!(o.flag(key), Some(want), "{flag}");
        for other in ALL.iter().filter(|k| k.name != key.name) {
            assert_eq!(o.flag(other), None, "{flag} set {}", other.name);
        }
    }
}

#[test]
fn the_config_file_is_refused_whole_in_serdes_words() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agentd.toml");
    let refused = |text: &str| {
        std::fs::write(&path, text).unwrap();
        let e = Options {
            config: Some(path.clone()),
            ..base()
        }
        .resolve(host())
        .unwrap_err();
        assert_eq!(e.key, "Z4J_CONFIG", "{e}");
        let prefix = format!("{} is not valid: ", path.display());
        e.message
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{e}"))
            .to_string()
    };
    assert_eq!(
        // Keys come in name order: the first unknown one in that order.
        refused("log_format = \"text\"\ntoken = \"x\"\nbrain_ulr = 1\n"),
        "unknown field `brain_ulr`, expected one of `brain_url`, `token_file`, \
         `hmac_secret_file`, `project_id`, `agent_name`, `environment`, `dev_mode`, \
         `worker_id`, `engines`, `capabilities`, `ca_file`, `buffer_path`, \
         `buffer_max_events`, `buffer_max_bytes`, `buffer_overflow`, \
         `buffer_synchronous`, `socket_path`, `socket_mode`, `allowed_uids`, \
         `allowed_gids`, `max_clients`, `batch_max_events`, `inflight_frames`, \
         `ack_timeout_seconds`, `transport`, `longpoll_max_body_bytes`, `ws_retry_seconds`, \
         `shutdown_grace_seconds`, `restart_grace_seconds`, \
         `log_format`, `log_level`, `metrics_addr`, `metrics_allow_remote`, \
         `gateway_addr`, `gateway_tokens_file`, `gateway_max_connections`"
    );
    assert_eq!(
        refused("log_level = 5\n"),
        "invalid type: integer `5`, expected a string"
    );
    assert_eq!(
        refused("token_file = [1]\n"),
        "invalid type: sequence, expected path string"
    );
    // A wrong type is found before any setting is checked.
    assert_eq!(
        refused("batch_max_events = 9000\nbrain_url = true\n"),
        "invalid type: boolean `true`, expected a string"
    );
}

#[test]
fn the_restart_grace_defaults_to_a_minute_may_be_off_and_is_bounded() {
    assert_eq!(
        base().resolve(host()).unwrap().restart_grace,
        Duration::from_secs(60)
    );
    let off = Options {
        restart_grace_seconds: Some("0".into()),
        ..base()
    };
    assert_eq!(off.resolve(host()).unwrap().restart_grace, Duration::ZERO);
    let long = Options {
        restart_grace_seconds: Some("3601".into()),
        ..base()
    };
    assert_eq!(
        long.resolve(host()).unwrap_err().key,
        "Z4J_RESTART_GRACE_SECONDS"
    );
}
