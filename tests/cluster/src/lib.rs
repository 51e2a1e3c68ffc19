//! A scratch PostgreSQL cluster per test, run as the `postgres` OS user with memory_ext
//! preloaded, and helpers to talk to it over ordinary autocommit connections. The server's
//! programs come from `MEMORY_EXT_PG_BIN` (scripts/cluster.sh sets it), Debian's 15 by default.

pub mod fake_llm;
pub mod mock_rules;

use postgres::{Client, NoTls};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// The directory of the server's programs (initdb, pg_ctl, pg_dump, ...).
pub fn pg_bin() -> String {
    std::env::var("MEMORY_EXT_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into())
}

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    /// The programs of this cluster's PostgreSQL major (pg_upgrade tests run two).
    pub bin: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh directory for one test's cluster, owned by the postgres OS user.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = PathBuf::from(format!(
        "/var/tmp/memory_ext_cluster_tests/{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Command::new("chown")
        .args([
            "-R",
            "postgres:postgres",
            "/var/tmp/memory_ext_cluster_tests",
        ])
        .status()
        .unwrap();
    dir
}

/// Run a PostgreSQL program as the postgres OS user; panic with its stderr if it fails.
fn run_as_postgres(args: &[&str]) {
    let out = as_postgres(args);
    assert!(
        out.status.success(),
        "{}: {}",
        args[0],
        String::from_utf8_lossy(&out.stderr)
    );
}

fn as_postgres(args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .args(args)
        .output()
        .expect("runuser")
}

impl Cluster {
    /// initdb + start, with extra postgresql.conf lines; the extension is created.
    pub fn start(name: &str, conf: &[&str]) -> Cluster {
        Self::start_with(name, conf, true)
    }

    /// Like `start`, choosing whether memory_ext is in shared_preload_libraries.
    pub fn start_with(name: &str, conf: &[&str], preload: bool) -> Cluster {
        let c = Self::init(name, conf, preload, &pg_bin(), &[]);
        c.ctl("start");
        c.client()
            .batch_execute("CREATE EXTENSION memory_ext")
            .unwrap();
        c
    }

    /// initdb (with `initdb_args`) with the programs in `bin`, configured like `start_with`; not
    /// started, and no extension created.
    pub fn init(
        name: &str,
        conf: &[&str],
        preload: bool,
        bin: &str,
        initdb_args: &[&str],
    ) -> Cluster {
        let dir = scratch_dir(name);
        let data = dir.join("data");
        let mut args = vec![
            format!("{bin}/initdb"),
            "-D".into(),
            data.display().to_string(),
            "-A".into(),
            "trust".into(),
            "-U".into(),
            "postgres".into(),
            "--locale=C.UTF-8".into(),
        ];
        args.extend(initdb_args.iter().map(|s| s.to_string()));
        run_as_postgres(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let preload = if preload { "memory_ext" } else { "" };
        let mut lines = vec![
            "listen_addresses = ''".to_string(),
            format!("shared_preload_libraries = '{preload}'"),
            "memory_ext.database = 'postgres'".into(),
            "max_connections = 60".into(),
            // the tests drive failures through the mock's directives
            "memory_ext.mock_directives = on".into(),
        ];
        lines.extend(conf.iter().map(|s| s.to_string()));
        Cluster::configured(dir, &lines, bin)
    }

    /// Run the PostgreSQL program `program` (pg_dump, createdb, ...) of this cluster's major
    /// against it, as the postgres OS user; panic with its stderr if it fails.
    pub fn run(&self, program: &str, args: &[&str]) -> String {
        let port = self.port.to_string();
        let mut a = vec![
            format!("{}/{program}", self.bin),
            "-h".into(),
            self.dir.display().to_string(),
            "-p".into(),
            port,
            "-U".into(),
            "postgres".into(),
        ];
        a.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = as_postgres(&refs);
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A streaming standby of `primary` (pg_basebackup -R), started.
    pub fn standby_of(primary: &Cluster, name: &str) -> Cluster {
        let dir = scratch_dir(name);
        let data = dir.join("data");
        run_as_postgres(&[
            &format!("{}/pg_basebackup", primary.bin),
            "-D",
            data.to_str().unwrap(),
            "-R",
            "-X",
            "stream",
            "-h",
            primary.dir.to_str().unwrap(),
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
        ]);
        let c = Cluster::configured(dir, &["hot_standby = on".into()], &primary.bin);
        c.ctl("start");
        c
    }

    /// Give the cluster in `dir` its own port and socket directory (later lines win), plus `lines`.
    fn configured(dir: PathBuf, lines: &[String], bin: &str) -> Cluster {
        let port = free_port();
        let conf_path = dir.join("data").join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path).unwrap();
        text.push_str(&format!(
            "port = {port}\nunix_socket_directories = '{}'\n",
            dir.display()
        ));
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(&conf_path, text).unwrap();
        Cluster {
            dir,
            port,
            bin: bin.to_string(),
        }
    }

    pub fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    pub fn ctl(&self, action: &str) {
        self.ctl_args(&[action]);
    }

    pub fn ctl_args(&self, args: &[&str]) {
        self.ctl_env(&[], args);
    }

    /// Stop the server and start it again with `env` (NAME=value) in its environment.
    pub fn restart_with_env(&self, env: &[&str]) {
        self.ctl("stop");
        self.ctl_env(env, &["start"]);
    }

    fn ctl_env(&self, env: &[&str], args: &[&str]) {
        let log = self.dir.join("server.log").display().to_string();
        let data = self.data();
        let mut a: Vec<String> = std::iter::once("env".to_string())
            .chain(env.iter().map(|e| e.to_string()))
            .collect();
        a.extend([
            format!("{}/pg_ctl", self.bin),
            "-D".into(),
            data,
            "-l".into(),
            log,
            "-w".into(),
        ]);
        a.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = as_postgres(&refs);
        assert!(
            out.status.success(),
            "pg_ctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn client(&self) -> Client {
        self.client_db("postgres")
    }

    pub fn client_db(&self, db: &str) -> Client {
        self.try_client_db(db, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("connect: {e}"))
    }

    /// Connect to `db`, retrying for up to `timeout` (the server may be starting or
    /// crash-restarting); the last error once it has passed.
    pub fn try_client_db(&self, db: &str, timeout: Duration) -> Result<Client, postgres::Error> {
        let deadline = Instant::now() + timeout;
        loop {
            match postgres::Config::new()
                .host_path(&self.dir)
                .port(self.port)
                .user("postgres")
                .dbname(db)
                .connect(NoTls)
            {
                Ok(c) => return Ok(c),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Is the postmaster running (`pg_ctl status`)?
    pub fn running(&self) -> bool {
        as_postgres(&[
            &format!("{}/pg_ctl", self.bin),
            "-D",
            &self.data(),
            "status",
        ])
        .status
        .success()
    }

    /// Worker status and queue state, for failure messages.
    pub fn diagnostics(&self, c: &mut Client) -> String {
        let q = "SELECT format('worker: %s | queue: %s | leased chats: %s', \
                 (SELECT row_to_json(w)::text FROM memory.worker_status() w), \
                 (SELECT json_agg(s)::text FROM memory.queue_stats s), \
                 (SELECT json_agg(json_build_object('chat', chat_id, 'owner', lease_owner, 'until', lease_until, 'retry_at', retry_at))::text \
                    FROM memory.chat_metadata WHERE lease_token IS NOT NULL OR retry_at IS NOT NULL))";
        c.query_one(q, &[])
            .map(|r| r.get::<_, String>(0))
            .unwrap_or_else(|e| format!("(no diagnostics: {e})"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// The last `lines` lines of the server log, for failure messages of long-running tests.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn worker_pid(&self, c: &mut Client) -> Option<i32> {
        c.query_opt(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'memory_ext worker'",
            &[],
        )
        .unwrap()
        .map(|r| r.get(0))
    }

    /// Poll `sql` (returning one bool) until true or the deadline; panic with `what` otherwise.
    pub fn eventually(&self, c: &mut Client, sql: &str, what: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            // A crash-restart closes connections (even one opened just before it): reconnect.
            if c.is_closed() {
                *c = self.client();
            }
            let ok: bool = c.query_one(sql, &[]).map(|r| r.get(0)).unwrap_or(false);
            if ok {
                return;
            }
            if Instant::now() >= deadline {
                let diag = self.diagnostics(c);
                panic!(
                    "timed out waiting for: {what}\n{diag}\n--- server log ---\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(&[
            &format!("{}/pg_ctl", self.bin),
            "-D",
            &self.data(),
            "-m",
            "immediate",
            "-w",
            "stop",
        ]);
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// memory.wait() on a queue id (30 s), returning its status.
pub fn wait(c: &mut Client, id: &str) -> String {
    c.query_one("SELECT memory.wait($1::text::uuid, '30 seconds')", &[&id])
        .unwrap()
        .get(0)
}

/// The one text value `sql` returns.
pub fn text(c: &mut Client, sql: &str) -> String {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// Enqueue and return the queue id.
pub fn enqueue(c: &mut Client, chat: &str, snippet: &str) -> String {
    c.query_one(
        "SELECT queue_id::text FROM memory.enqueue($1, $2)",
        &[&chat, &snippet],
    )
    .unwrap()
    .get(0)
}

/// Enqueue (chat, snippet) pairs in one transaction: the worker sees them all at its COMMIT.
pub fn enqueue_together(c: &mut Client, snippets: &[(String, String)]) {
    let mut tx = c.transaction().unwrap();
    for (chat, snippet) in snippets {
        tx.execute("SELECT memory.enqueue($1, $2)", &[chat, snippet])
            .unwrap();
    }
    tx.commit().unwrap();
}

/// All queue ids of a chat's applied versions, in version order.
pub fn applied_ids(c: &mut Client, chat: &str) -> Vec<String> {
    c.query(
        "SELECT u::text FROM memory.chat_memory_history h, unnest(h.queue_ids) WITH ORDINALITY AS x(u, o) \
         WHERE h.chat_id = $1 ORDER BY h.version, x.o",
        &[&chat],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Queue ids of a chat in enqueue order.
pub fn enqueued_ids(c: &mut Client, chat: &str) -> Vec<String> {
    c.query(
        "SELECT id::text FROM memory.chat_context_queue WHERE chat_id = $1 ORDER BY seq",
        &[&chat],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// A small seeded PRNG (splitmix64) for reproducible randomized tests: the same seed gives the
/// same sequence on every platform, with no dependency.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// An independent stream for `index` (a thread, a component) derived from `seed`.
    pub fn derived(seed: u64, index: u64) -> Rng {
        let mut r = Rng(seed ^ index.wrapping_mul(0xA076_1D64_78BD_642F));
        Rng(r.next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}
