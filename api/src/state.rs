//! The state shared by every handler.

use ekm_service::app::App;

use crate::rate_limit::RateDefaults;

#[derive(Clone)]
pub struct AppState {
    pub app: App,
    /// The rate limits of organizations that set none; the router sets them from its
    /// `Limits` (`router_with_limits`).
    rate: RateDefaults,
}

impl AppState {
    pub fn new(app: App) -> Self {
        AppState {
            app,
            rate: RateDefaults::default(),
        }
    }

    pub(crate) fn set_rate_defaults(&mut self, rate: RateDefaults) {
        self.rate = rate;
    }

    pub fn rate_defaults(&self) -> &RateDefaults {
        &self.rate
    }
}
