//! The KVM memory listener: flat-view changes in, memslot updates out. All state lives in the
//! [`SlotTable`] it shares with the [`super::KvmAccel`].

use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::Result;
use crate::listener::{MemoryListener, MemorySection};
use crate::ramblock::RamBlockRegistry;

use super::table::{lock, SlotTable};

pub struct KvmListener {
    table: Arc<Mutex<SlotTable>>,
}

impl KvmListener {
    pub fn new(table: Arc<Mutex<SlotTable>>) -> Self {
        KvmListener { table }
    }

    fn table(&self) -> MutexGuard<'_, SlotTable> {
        lock(&self.table)
    }
}

impl MemoryListener for KvmListener {
    fn name(&self) -> &str {
        super::LISTENER_NAME
    }

    fn region_del(&mut self, section: &MemorySection) -> Result<()> {
        Ok(self.table().remove_section(section)?)
    }

    fn region_add(&mut self, section: &MemorySection) -> Result<()> {
        Ok(self.table().add_section(section)?)
    }

    fn log_global_start(&mut self) -> Result<()> {
        Ok(self.table().log_start()?)
    }

    fn log_global_stop(&mut self) -> Result<()> {
        Ok(self.table().log_stop()?)
    }

    fn log_sync(&mut self, ramblocks: &mut RamBlockRegistry) -> Result<()> {
        self.table().log_sync(ramblocks)?;
        Ok(())
    }
}
