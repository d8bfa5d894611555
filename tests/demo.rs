//! The README's main job (`weir demo`) on a small load, so CI proves it works end to end.

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_to_completion() {
    let config = weir::config::Config {
        brokers: common::brokers(),
        database_url: common::fresh_database().await,
        metrics_addr: Some(([127, 0, 0, 1], 0).into()),
        topics_dir: common::repo_path("topics"),
        workflows: common::repo_path("workflows"),
        ..Default::default()
    };
    weir::ops::demo::run(config, 300, 7)
        .await
        .expect("demo completes: every matching event called once and stored once");
}
