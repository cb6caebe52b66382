pub struct AgentOptions { pub master: String, pub token: String, pub workdir: std::path::PathBuf }
#[derive(Debug, thiserror::Error)]
#[error("x")]
pub struct AgentError;
pub async fn run(_o: AgentOptions) -> Result<(), AgentError> { todo!() }
