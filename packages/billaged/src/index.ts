export { billaged } from "./definition.js";
