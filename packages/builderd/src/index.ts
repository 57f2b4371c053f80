export { builderd } from "./definition.js";
