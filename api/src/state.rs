//! The state shared by every handler.

use crate::app::App;

#[derive(Clone)]
pub struct AppState {
    pub app: App,
}
