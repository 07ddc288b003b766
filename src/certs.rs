//! `tandem tls init`: certificate material for a cluster that is not started by
//! `tandem up` (which makes its own): a fresh cluster CA and one identity that
//! every process of the cluster can share, in the layout `--tls-dir` reads.

use std::path::Path;

use anyhow::Context;
use tandem_kv_transfer::tls::ClusterCa;

/// Writes `ca.pem`, `node.pem` and `node.key` into `dir` (created if missing):
/// a new CA named after `cluster`, and a certificate from it valid for `names`
/// (DNS names or IP addresses; processes that share it pass the first one as
/// `--tls-name`). Refuses to overwrite existing files.
pub fn init(dir: &Path, cluster: &str, names: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(
        !names.is_empty(),
        "give at least one --name for the certificate"
    );
    for file in ["ca.pem", "node.pem", "node.key"] {
        let path = dir.join(file);
        anyhow::ensure!(
            !path.exists(),
            "{} already exists: remove it or choose another directory",
            path.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = ClusterCa::generate(&format!("tandem {cluster} cluster"))?;
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let files = ca.issue(&names)?.write_files(dir)?;
    restrict(&files.key)?;
    Ok(())
}

/// Makes `path` readable by its owner only.
fn restrict(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tandem_kv_transfer::tls::{IdentityFiles, NodeIdentity};

    #[test]
    fn writes_a_usable_identity_and_never_overwrites() {
        let dir = std::env::temp_dir().join(format!("tandem-tls-init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init(&dir, "prod", &["tandem-worker".into()]).expect("init");
        let files = IdentityFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("node.pem"),
            key: dir.join("node.key"),
        };
        let id = NodeIdentity::from_files(&files).expect("readable identity");
        id.server_config().expect("a server config");
        id.client_config().expect("a client config");
        let mode = std::fs::metadata(&files.key)
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = init(&dir, "prod", &["tandem-worker".into()]).unwrap_err();
        assert!(again.to_string().contains("already exists"), "{again}");
        assert!(init(&dir.join("x"), "prod", &[]).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
