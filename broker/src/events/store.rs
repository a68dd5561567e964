//! Consumer groups and their checkpoints, in the main store (one JSON row per group).

use std::sync::Arc;

use super::{ConsumerGroup, EventsError};
use crate::storage::{JsonTable, Store};

const GROUPS: JsonTable<ConsumerGroup> = JsonTable::new("consumer_groups");

#[derive(Clone)]
pub struct GroupStore {
    db: Arc<Store>,
}

impl GroupStore {
    pub fn open(db: Arc<Store>) -> Result<GroupStore, EventsError> {
        let store = GroupStore { db };
        store.load()?;
        Ok(store)
    }

    pub fn load(&self) -> Result<Vec<ConsumerGroup>, EventsError> {
        Ok(GROUPS
            .load::<EventsError>(&self.db)?
            .into_iter()
            .map(|(_, g)| g)
            .collect())
    }

    pub fn put(&self, group: &ConsumerGroup) -> Result<(), EventsError> {
        let tx = self.db.begin_write()?;
        GROUPS.put::<EventsError>(&tx, &group.name, group)?;
        tx.commit()?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<(), EventsError> {
        let tx = self.db.begin_write()?;
        GROUPS.remove::<EventsError>(&tx, name)?;
        tx.commit()?;
        Ok(())
    }
}
