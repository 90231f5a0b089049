//! The state shared by every handler.

use ekm_service::app::App;

#[derive(Clone)]
pub struct AppState {
    pub app: App,
}
